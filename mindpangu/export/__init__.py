"""MindIR export for deployment."""
from .mindir import export_for_serving, export_mindir, load_mindir, with_backend

__all__ = ["export_for_serving", "export_mindir", "load_mindir", "with_backend"]
