"""Parallel layouts: meshes, rank plans and validation, memory estimates, MindSpore shard strategies,
virtual-rank emulation and simulated Ascend compiles."""
from .mesh import PRESETS, Mesh, resolve_mesh
from .plan import Layout, ParallelConfigError, check_layout, coordinates, groups, stage_plan

__all__ = ["PRESETS", "Layout", "Mesh", "ParallelConfigError", "check_layout", "coordinates", "groups",
           "resolve_mesh", "stage_plan"]
