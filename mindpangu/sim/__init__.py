"""Layout simulator: model shapes, FLOP counts, pipeline schedules (and, as it grows, communication, step time,
memory and layout search) for predicting how a recipe trains on a named cluster before booking it."""
from .flops import forward_flops_per_token, training_flops
from .pipeline import bubble_fractions
from .shape import ModelShape

__all__ = ["ModelShape", "bubble_fractions", "forward_flops_per_token", "training_flops"]
