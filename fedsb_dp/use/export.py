"""Exporting a run's trained model: a PEFT LoRA adapter, a merged model, or fedsb-dp's own.

Three formats, every one with an ``export.json`` (run, method, ε and δ recomputed from the
ledger, base model, format):

``peft``
    A standard PEFT LoRA adapter. Fed-SB's ΔW = s·B R A is written as ``lora_B = B·R``,
    ``lora_A = A`` with ``lora_alpha = s·r`` (PEFT scales by alpha / r = s), so PEFT computes
    the same ΔW; the LoRA baselines' factors go over as they are. A classification head is
    saved through ``modules_to_save``. Refused for FedEx-LoRA and FLoRA, whose aggregated
    updates live in the base weights, which an adapter does not carry.
``merged``
    A plain ``transformers`` model with W0 + ΔW written into the weights (any method).
``sb``
    fedsb-dp's own adapter (LoRA-SB B, A, R and head; for the baselines their LoRA factors,
    head and folded base weights), reloaded by :func:`load_sb_export`.

A mean-pooled classifier (the default MiniLM run) cannot be expressed as an
``AutoModelForSequenceClassification``: BERT's classifier reads a [CLS] pooler. Its ``peft``
and ``merged`` exports therefore hold the *encoder* (``AutoModel``; the PEFT adapter is
relative to it), with the trained Linear head in ``head.safetensors`` and ``pooling.json``
saying how to read it: logits = head(masked mean of the last hidden states). The encoder
directory is a sentence-transformers-style layout in that respect (same pooling), and the
README shows the three lines that apply the head.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedsb_dp.adapters.inject import replace_submodule
from fedsb_dp.adapters.layer import SBLinear
from fedsb_dp.errors import ConfigError
from fedsb_dp.models import CAUSAL_LM, MeanPooledClassifier, find_head, pooling_of

if TYPE_CHECKING:
    from fedsb_dp.models import LoadedModel
    from fedsb_dp.runs import Run

FORMATS: tuple[str, ...] = ("peft", "merged", "sb")
EXPORT_JSON = "export.json"
HEAD_FILE = "head.safetensors"
POOLING_FILE = "pooling.json"


def check_export(run: Run, out: str, fmt: str, *, force: bool = False) -> None:
    """Refuse what cannot be exported, before any model is loaded or file written.

    Raises:
        ConfigError: An unknown format, a non-empty ``out`` without ``force``, or a format
            that cannot express the run's model.
    """
    from fedsb_dp.federated.setup import make_method

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ConfigError(f"--out {out!r} exists and is not empty; choose another directory "
                          "or add --force to replace it")
    if os.path.abspath(out) == os.path.abspath(run.path):
        raise ConfigError(f"--out {out!r} is the run directory itself; choose another")
    method = make_method(run.config)
    if fmt == "peft" and method.folds_base:
        raise ConfigError(
            f"--format peft cannot express a {method.name} run: its aggregated updates are "
            "folded into the base weights, which a PEFT adapter does not carry (loading the "
            "adapter on the original base would give another model); use --format merged, "
            "or --format sb")


def export_run(run: Run, out: str, fmt: str, *, force: bool = False) -> str:
    """Export a run's latest model (final, or last completed round) to ``out``.

    The export is written next to ``out`` and moved into place at the end, so a failure
    leaves ``out`` as it was.

    Args:
        run: The run (:func:`fedsb_dp.load_run`).
        out: Output directory.
        fmt: One of :data:`FORMATS`.
        force: Replace a non-empty ``out``.

    Returns:
        ``out``.

    Raises:
        ConfigError: See :func:`check_export`.
    """
    check_export(run, out, fmt, force=force)
    loaded = run.load_model(device="cpu")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        layout = _write(run, loaded, tmp, fmt)
        with open(os.path.join(tmp, EXPORT_JSON), "w", encoding="utf-8") as fh:
            json.dump(export_record(run, loaded, fmt, layout), fh, indent=2, sort_keys=True)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_record(run: Run, loaded: LoadedModel, fmt: str, layout: str) -> dict[str, Any]:
    """What ``export.json`` holds; ε and δ are recomputed from the run's ledger here."""
    from fedsb_dp import __version__
    from fedsb_dp.federated import run_dir as rd

    privacy = run.privacy() if run.config.private else None
    saved = rd.read_json(os.path.join(run.path, rd.CONFIG))
    config = {k: v for k, v in run.config.to_dict().items() if k not in ("out", "device")}
    return {
        "format": fmt,
        "layout": layout,
        "run_id": os.path.basename(os.path.abspath(run.path)),
        "run_config_digest": saved.get("digest"),
        "run_status": run.status,
        "rounds_completed": len(run.metrics),
        "method": run.config.method,
        "task": run.config.task,
        "private": privacy is not None,
        # None for a non-private run: JSON has no infinity, and ε = ∞ is no guarantee.
        "epsilon": privacy.epsilon if privacy else None,
        "delta": privacy.delta if privacy else None,
        "privacy_unit": privacy.unit if privacy else None,
        "accountant": run.config.accountant if privacy else None,
        "base_model": run.config.model,
        "base_model_path": loaded.resolved_path,
        "pooling": pooling_of(loaded.model) if run.config.task != CAUSAL_LM else None,
        "label_names": run.label_names,
        "run_config": config,
        "fedsb_dp_version": __version__,
    }


def _write(run: Run, loaded: LoadedModel, directory: str, fmt: str) -> str:
    model, tokenizer = loaded.model, loaded.tokenizer
    if fmt == "sb":
        from fedsb_dp.federated.setup import make_method, sb_config

        make_method(run.config).save_adapter(model, directory, sb_config(run.config),
                                             base_model=loaded.resolved_path)
        tokenizer.save_pretrained(directory)
        return "fedsb-dp adapter: load with fedsb_dp.use.export.load_sb_export(dir)"
    mean = run.config.task != CAUSAL_LM and pooling_of(model) == "mean"
    if fmt == "merged":
        plain = plain_copy(model, merge=True)
        target = _encoder(plain) if mean else plain
        for p in target.parameters():
            p.requires_grad_(True)  # saved as a trainable model, as from_pretrained gives
        target.save_pretrained(directory)
        layout = "AutoModel + head.safetensors (mean pooling)" if mean else (
            "AutoModelForCausalLM" if run.config.task == CAUSAL_LM
            else "AutoModelForSequenceClassification")
    else:
        save_peft(model, directory, base_model=loaded.resolved_path, task=run.config.task,
                  encoder_only=mean)
        layout = ("PeftModel on AutoModel + head.safetensors (mean pooling)" if mean else
                  "PeftModel on AutoModelForCausalLM" if run.config.task == CAUSAL_LM
                  else "PeftModel on AutoModelForSequenceClassification")
    if mean:
        _save_mean_head(model, directory)
    tokenizer.save_pretrained(directory)
    return layout


def _encoder(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def adapted_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Every adapted layer's (A, B, s) with ΔW = s·B A: Fed-SB's B is B·R."""
    from fedsb_dp.methods.base import adapted_layers

    out = {}
    for name, layer in adapted_layers(model).items():
        if isinstance(layer, SBLinear):
            if layer.merged or layer.active_rank not in (None, layer.rank):
                raise ConfigError(f"{name}: a merged or rank-restricted layer cannot be exported")
            out[name] = (layer.lora_sb_A, layer.lora_sb_B @ layer.R.weight, layer.scaling)
        else:
            out[name] = (layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    return {k: (a.detach(), b.detach(), s) for k, (a, b, s) in out.items()}


@torch.no_grad()
def plain_copy(model: nn.Module, *, merge: bool) -> nn.Module:
    """A copy with every adapter layer replaced by its base layer (W0 + ΔW if ``merge``)."""
    from fedsb_dp.methods.base import adapted_layers

    plain = copy.deepcopy(model)
    for name, layer in adapted_layers(plain).items():
        base = layer.base_layer
        if merge:
            merged = base.weight + layer.get_delta_weight().to(base.weight.device)
            if not torch.isfinite(merged).all():
                raise ConfigError(f"{name}: merging gives non-finite weights")
            base.weight.copy_(merged.to(base.weight.dtype))
        replace_submodule(plain, name, base)
    return plain


def save_peft(model: nn.Module, directory: str, *, base_model: str, task: str,
              encoder_only: bool = False) -> None:
    """Write a PEFT LoRA adapter computing the model's ΔW on every adapted layer.

    Args:
        model: A model with LoRA-SB or LoRA layers (base weights as pretrained).
        directory: Output directory for ``PeftModel.from_pretrained``.
        base_model: Recorded as the adapter's base model.
        task: ``"sequence-classification"`` or ``"causal-lm"``.
        encoder_only: Adapt the encoder (``AutoModel``) alone, without head (mean pooling).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    from fedsb_dp.adapters.export import head_modules

    factors = adapted_factors(model)
    if not factors:
        raise ConfigError("the model has no adapter layers to export")
    ranks = {a.shape[0] for a, _, _ in factors.values()}
    scalings = {s for _, _, s in factors.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ConfigError(f"a PEFT adapter has one rank and scaling; found {ranks}, {scalings}")
    rank, scaling = ranks.pop(), scalings.pop()
    base = plain_copy(model, merge=False)
    prefix = ""
    if encoder_only:
        prefix = base.base_model_prefix + "."
        base = _encoder(base)
        task_type, heads = TaskType.FEATURE_EXTRACTION, {}
    elif task == CAUSAL_LM:
        task_type, heads = TaskType.CAUSAL_LM, {}
    else:
        task_type, heads = TaskType.SEQ_CLS, head_modules(model)
    names = {name: name.removeprefix(prefix) for name in factors}
    config = LoraConfig(r=rank, lora_alpha=scaling * rank, lora_dropout=0.0,
                        target_modules=sorted(names.values()),
                        modules_to_save=sorted(heads) or None, task_type=task_type,
                        init_lora_weights=False)
    base.config.name_or_path = base_model
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (A, B, _) in factors.items():
            target = inner.get_submodule(names[name])
            target.lora_A["default"].weight.copy_(A)
            target.lora_B["default"].weight.copy_(B)
        for name, module in heads.items():
            wrapper = inner.get_submodule(name)
            wrapper.modules_to_save["default"].load_state_dict(module.state_dict())
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    peft_model.save_pretrained(directory)


def _save_mean_head(model: nn.Module, directory: str) -> None:
    from safetensors.torch import save_file

    name, head = find_head(model)
    linear = head.out_proj if isinstance(head, MeanPooledClassifier) else head
    if not isinstance(linear, nn.Linear):
        raise ConfigError(f"a mean-pooled head must be one Linear layer; {name} is "
                          f"{type(linear).__name__}")
    save_file({"weight": linear.weight.detach().cpu().contiguous(),
               "bias": linear.bias.detach().cpu().contiguous()},
              os.path.join(directory, HEAD_FILE))
    labels = [model.config.id2label[i] for i in range(linear.out_features)]
    with open(os.path.join(directory, POOLING_FILE), "w", encoding="utf-8") as fh:
        json.dump({"pooling": "mean", "head": HEAD_FILE, "label_names": labels,
                   "logits": "head.weight @ mean(last_hidden_state over attention_mask) "
                             "+ head.bias"}, fh, indent=2)


def load_sb_export(directory: str, *, device: str | None = None) -> LoadedModel:
    """Rebuild the model of a ``--format sb`` export on its base model, in eval mode.

    Raises:
        ConfigError: If ``directory`` is not an ``sb`` export.
    """
    from fedsb_dp.federated.run_config import RunConfig
    from fedsb_dp.use.loading import assemble

    path = os.path.join(directory, EXPORT_JSON)
    if not os.path.isfile(path):
        raise ConfigError(f"{directory!r} is not an export (no {EXPORT_JSON})")
    with open(path, encoding="utf-8") as fh:
        record = json.load(fh)
    if record.get("format") != "sb":
        raise ConfigError(f"{directory!r} is a {record.get('format')!r} export; load it with "
                          "PEFT/transformers (see its export.json 'layout')")
    from fedsb_dp.federated.run_dir import saved_settings

    config = RunConfig.from_dict(saved_settings(record["run_config"]))
    return assemble(config, record["label_names"], directory, device=device)


def export_into_run_dir(run_dir: str, *, merged: bool, peft: bool) -> None:
    """The run-time ``--export-merged``/``--export-peft``: export a finished run in place.

    Both engines call this after their run, so the flags give what ``fedsb-dp export`` gives.
    """
    from fedsb_dp.runs import load_run

    if not (merged or peft):
        return
    run = load_run(run_dir)
    if merged:
        export_run(run, os.path.join(run_dir, "merged"), "merged")
    if peft:
        export_run(run, os.path.join(run_dir, "peft_adapter"), "peft")
