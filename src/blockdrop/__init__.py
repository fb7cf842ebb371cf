"""blockdrop: Progressive Block Drop for temporal action detection models."""

__version__ = "0.1.0"
