"""factedit: locate, edit and verify facts through their recall circuits."""

from factedit.models.loading import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]
