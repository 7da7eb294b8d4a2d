"""valueprobe.plugin: the runtime half. Load an artifact, hook a model, read calibrated confidence.

Imports nothing from ``valueprobe.calibration`` or ``valueprobe.server`` (one-way imports).
"""

from .artifact import (
    ArtifactData,
    ArtifactError,
    ArtifactMismatchError,
    FingerprintMismatchError,
    load_artifact,
    read_metadata,
    save_artifact,
)
from .hooks import LayerNotFoundError, capture, find_decoder_layers, last_token_positions
from .models import KNOWN_MODELS, load_model
from .probe import ProbeHandle, ProbeResult, ValueProbe
from .prompting import PromptError, PromptFormat

__all__ = [
    "ArtifactData",
    "ArtifactError",
    "ArtifactMismatchError",
    "FingerprintMismatchError",
    "KNOWN_MODELS",
    "LayerNotFoundError",
    "ProbeHandle",
    "ProbeResult",
    "PromptError",
    "PromptFormat",
    "ValueProbe",
    "capture",
    "find_decoder_layers",
    "last_token_positions",
    "load_artifact",
    "load_model",
    "read_metadata",
    "save_artifact",
]
