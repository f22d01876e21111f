from flow_matching._stub import _NotUsed as CondOTScheduler

__all__ = ["CondOTScheduler"]
