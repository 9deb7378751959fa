"""Mixture-of-experts pieces: routers (top-k, MoGE), dropless dispatch, the MoE layer."""
from .dispatch import GroupedExperts, block_size, permute_plan
from .kernels import kernel_library, resolve_backend
from .layer import MoELayer
from .router import Router, expert_counts

__all__ = ["GroupedExperts", "MoELayer", "Router", "block_size", "expert_counts", "kernel_library", "permute_plan",
           "resolve_backend"]
