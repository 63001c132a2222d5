"""Fed-SB on Flower 1.42: a ClientApp, a ServerApp and a Strategy over the engine's pieces.

Needs the ``flower`` extra (``pip install -e '.[flower]'``); nothing else in ``fedsb_dp``
imports ``flwr``. The modules are thin adapters: clients train with
:meth:`fedsb_dp.federated.client.DPClient.train_round`, the server checks replies with
:func:`fedsb_dp.federated.server.validate_update`, averages with
:func:`fedsb_dp.federated.server.weighted_mean`, and keeps the same
:class:`accounting.PrivacyLedger` and :class:`accounting.BudgetGuard` as the in-process engine.
See ``docs/distributed.md``.
"""
