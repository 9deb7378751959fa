"""Inference: prefill / in-place cached decode / MTP draft steps, weight loading, sampling, batched generation and
MTP speculative decoding."""
from .steps import DecodeStep, DraftPrefillStep, DraftStep, PrefillStep, load_caches
from .weights import load_model

__all__ = ["DecodeStep", "DraftPrefillStep", "DraftStep", "PrefillStep", "load_caches", "load_model"]
