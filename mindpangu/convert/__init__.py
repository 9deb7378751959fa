"""Checkpoint conversion: Hugging Face directories and MindSpore checkpoints."""
from .hf import (config_from_hf, config_to_hf, from_pretrained, hf_to_internal, internal_to_hf, load_hf_directory,
                 save_hf_directory)

__all__ = ["config_from_hf", "config_to_hf", "from_pretrained", "hf_to_internal", "internal_to_hf",
           "load_hf_directory", "save_hf_directory"]
