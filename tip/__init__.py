"""tip: token importance in on-policy distillation."""

__version__ = "0.1.0"
