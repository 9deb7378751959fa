"""Mixture-of-experts pieces: routers (top-k, MoGE), dropless dispatch, the MoE layer."""
from .dispatch import GroupedExperts, block_size, permute_plan
from .layer import MoELayer
from .router import Router, expert_counts

__all__ = ["GroupedExperts", "MoELayer", "Router", "block_size", "expert_counts", "permute_plan"]
