"""gnlib: exact Gauss-Newton optimization of transformer language models, as a research workbook."""

__version__ = "0.1.0"
