"""Federated Fed-SB: DP-SGD clients, the averaging server, and the in-process engine."""
