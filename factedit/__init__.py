"""factedit: locate, edit and verify facts through their recall circuits."""

from factedit._version import __version__
from factedit.analysis.circuit import LocateConfig, RecallCircuit
from factedit.analysis.locate import locate
from factedit.editing.api import edit
from factedit.editing.config import EditConfig
from factedit.editing.requests import EditRequest, load_requests
from factedit.models.loading import load_model
from factedit.verify.checks import VerifyOptions
from factedit.verify.run import VerifyReport, verify

__all__ = ["EditConfig", "EditRequest", "LocateConfig", "RecallCircuit", "VerifyOptions", "VerifyReport", "edit",
           "load_model", "load_requests", "locate", "verify", "__version__"]
