"""mindpangu: Pangu Ultra MoE and Pangu Pro MoE on MindSpore."""
import os

# MindSpore's CPU backend logs many harmless [WARNING] lines (graph analyzer notes, missing Ascend symbols);
# show errors only unless the user set GLOG_v (2 = warnings).
os.environ.setdefault("GLOG_v", "3")

from .config import ConfigError, load_config
from .models import build_model
from .params import count_parameters

__version__ = "0.1.0"
__all__ = ["ConfigError", "build_model", "count_parameters", "from_pretrained", "load_config"]


def from_pretrained(path: str, **kwargs):
    """Build a model from a Hugging Face checkpoint directory (config.json + *.safetensors)."""
    from .convert.hf import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
