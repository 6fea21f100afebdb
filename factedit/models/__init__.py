"""Model loading and per-family layouts."""

from factedit.models.loading import load_model

__all__ = ["load_model"]
