"""Federated fine-tuning: aggregation strategies (pure functions, importable from here), the round engine,
clients, evaluation and the experiment driver."""

from federated.strategies import STRATEGY_NAMES, Strategy, fedavg_aggregate, fellrec_aggregate, make_strategy

__all__ = ["STRATEGY_NAMES", "Strategy", "fedavg_aggregate", "fellrec_aggregate", "make_strategy"]
