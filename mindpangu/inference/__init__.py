"""Inference: cached prefill / decode steps, weight loading, sampling, generation and MTP speculative decoding."""
from .steps import DecodeStep, DraftStep, PrefillStep
from .weights import load_model

__all__ = ["DecodeStep", "DraftStep", "PrefillStep", "load_model"]
