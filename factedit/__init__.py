"""factedit: locate, edit and verify facts through their recall circuits."""

from factedit._version import __version__
from factedit.analysis.circuit import LocateConfig, RecallCircuit
from factedit.analysis.locate import locate
from factedit.editing.api import edit
from factedit.editing.config import EditConfig
from factedit.editing.requests import EditRequest, load_requests
from factedit.models.loading import load_model

__all__ = ["EditConfig", "EditRequest", "LocateConfig", "RecallCircuit", "edit", "load_model", "load_requests",
           "locate", "__version__"]
