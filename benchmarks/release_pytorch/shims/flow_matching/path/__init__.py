from flow_matching._stub import _NotUsed as AffineProbPath

__all__ = ["AffineProbPath"]
