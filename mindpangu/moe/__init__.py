"""Mixture-of-experts pieces: routers (top-k, MoGE), token dispatchers, grouped experts, the MoE layer."""
from .experts import GroupedExperts
from ..kernels import kernel_library
from .layer import MoELayer
from .router import Router, expert_counts
from .token_dispatcher import (AlltoAllDispatcher, BlockPaddedDispatcher, ExpertMajorDispatcher, KernelDispatcher,
                               block_size, build_dispatcher, permute_plan, resolve_backend)

__all__ = ["AlltoAllDispatcher", "BlockPaddedDispatcher", "ExpertMajorDispatcher", "GroupedExperts",
           "KernelDispatcher", "MoELayer", "Router", "block_size", "build_dispatcher", "expert_counts",
           "kernel_library", "permute_plan", "resolve_backend"]
