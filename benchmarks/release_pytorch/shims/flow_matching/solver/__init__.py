from flow_matching._stub import _NotUsed as Solver
from flow_matching._stub import _NotUsed as ODESolver

__all__ = ["Solver", "ODESolver"]
