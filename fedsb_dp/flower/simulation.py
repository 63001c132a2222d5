"""``fedsb-dp run --engine flower-sim``: the Flower app on Flower's simulation engine.

One virtual SuperNode per client (``partition-id`` i of ``num-partitions`` N is set by the
simulation engine); ClientApps run in Ray actors, the ServerApp in this process.
"""

from __future__ import annotations

import dataclasses
import os

from fedsb_dp.errors import ConfigError, FedSBError
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.federated.inprocess import RunResult
from fedsb_dp.federated.protocol import RoundProtocol
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.flower.common import check_supported
from fedsb_dp.flower.run_config import FlowerOptions


def run_flower_simulation(config: RunConfig | None = None, *,
                          options: FlowerOptions | None = None, resume: str | None = None,
                          cpus_per_client: float = 1.0, verbose: bool = False) -> RunResult:
    """Run the federation with ``flwr.simulation.run_simulation``.

    Args:
        config: The run's settings (``config.out`` defaults to ``runs/run-<timestamp>``);
            ``None`` with ``resume``.
        resume: A run directory to continue from its last completed round (its saved
            settings are used).
        options: Flower-only settings (timeouts).
        cpus_per_client: Ray CPUs per ClientApp actor (how many train in parallel).
        verbose: Flower's verbose logging.

    Returns:
        Where the run is, how it ended, and its summary.

    Raises:
        FedSBError: If the server app ended without writing ``summary.json``.

    """
    from fedsb_dp.flower.client_app import ACCEPT_CLIENT_LEVEL_ENV

    options = options or FlowerOptions()
    if resume is not None:
        out = os.path.abspath(resume)
        config, _ = RoundProtocol.saved(out)
        options = dataclasses.replace(options, resume=True)
        if os.path.exists(os.path.join(out, rd.SUMMARY)):
            raise ConfigError(f"{out!r} has finished ({rd.SUMMARY} exists); nothing to resume")
    elif config is None:
        raise ConfigError("run_flower_simulation needs a config or a run directory to resume")
    else:
        out = os.path.abspath(config.out or rd.default_run_dir())
        rd.check_new_run_dir(out)
        config = RunConfig.from_dict({**config.to_dict(), "out": out})
    check_supported(config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One operator runs every simulated node, so a client-level run has their consent; the
    # nodes read it from their environment, which Ray's worker processes inherit.
    previous = os.environ.get(ACCEPT_CLIENT_LEVEL_ENV)
    if config.dp_level == "client":
        os.environ[ACCEPT_CLIENT_LEVEL_ENV] = "1"
    try:
        _simulate(config, options, cpus_per_client=cpus_per_client, verbose=verbose)
    finally:
        if previous is None:
            os.environ.pop(ACCEPT_CLIENT_LEVEL_ENV, None)
        else:
            os.environ[ACCEPT_CLIENT_LEVEL_ENV] = previous
    summary_path = os.path.join(out, rd.SUMMARY)
    if not os.path.exists(summary_path):
        raise FedSBError(f"the Flower simulation ended without {summary_path}; the server "
                         "app's error is in the log above")
    summary = rd.read_json(summary_path)
    return RunResult(run_dir=out, status=summary["status"], summary=summary)


def _simulate(config: RunConfig, options: FlowerOptions, *, cpus_per_client: float,
              verbose: bool) -> None:
    """One ``run_simulation`` of the app: a virtual SuperNode per client."""
    from flwr.simulation import run_simulation

    from fedsb_dp.flower.client_app import app as client_app
    from fedsb_dp.flower.server_app import make_server_app

    run_simulation(
        server_app=make_server_app(config, options),
        client_app=client_app,
        num_supernodes=config.clients,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                        "init_args": {"include_dashboard": False, "log_to_driver": verbose}},
        verbose_logging=verbose,
    )
