"""Model loading and per-family adapters."""

from factedit.models.loading import load_model

__all__ = ["load_model"]
