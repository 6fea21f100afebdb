"""factedit: locate, edit and verify facts through their recall circuits."""

from factedit.analysis.circuit import LocateConfig, RecallCircuit
from factedit.analysis.locate import locate
from factedit.models.loading import load_model

__version__ = "0.1.0"
__all__ = ["LocateConfig", "RecallCircuit", "load_model", "locate", "__version__"]
