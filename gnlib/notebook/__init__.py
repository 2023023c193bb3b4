"""Notebook-facing helpers beyond the public API: checked outputs that hold on every CPU."""

from gnlib.notebook.checked import fewer_steps, within

__all__ = ["fewer_steps", "within"]
