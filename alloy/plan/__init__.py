"""The planner: a cost model from the ModelSpec, a step-time model on measured devices, and a
search over layouts (replicas x pipeline stages x batch shares). No torch: plans are made anywhere."""

from alloy.plan.cost import Workload
from alloy.plan.plan import PLAN_VERSION, Plan, Stage
from alloy.plan.planner import fast_dtype, make_plan

__all__ = ["PLAN_VERSION", "Plan", "Stage", "Workload", "fast_dtype", "make_plan"]
