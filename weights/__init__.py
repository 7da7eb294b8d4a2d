"""Shipped value-probe artifacts for real models (see ``weights/README.md``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEFAULT_ARTIFACT_NAME = "qwen2.5-coder-1.5b-instruct.safetensors"


def default_artifact() -> Path:
    """Path of the shipped default artifact (the one ``valueprobe serve`` and ``score`` use with no flags)."""
    return Path(str(files(__name__) / DEFAULT_ARTIFACT_NAME))


def shipped_artifacts() -> list[Path]:
    return sorted(Path(str(p)) for p in files(__name__).iterdir() if str(p).endswith(".safetensors"))
