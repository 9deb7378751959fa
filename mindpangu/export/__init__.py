"""MindIR export for deployment."""
from .mindir import export_mindir, load_mindir, with_backend

__all__ = ["export_mindir", "load_mindir", "with_backend"]
