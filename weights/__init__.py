"""Shipped value-probe artifacts for real models (see ``weights/README.md``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEFAULT_ARTIFACT_NAME = "qwen2.5-coder-1.5b-instruct.safetensors"


def default_artifact() -> Path:
    """Path of the shipped default artifact (the one ``valueprobe serve`` and ``score`` use with no flags)."""
    return Path(str(files(__name__) / DEFAULT_ARTIFACT_NAME))


def shipped_artifacts(kind: str = "prompt") -> list[Path]:
    """Shipped artifacts of one kind: ``prompt`` (confidence in a prompt) or ``steps`` (step values for search,
    named ``*.steps.safetensors``)."""
    paths = sorted(Path(str(p)) for p in files(__name__).iterdir() if str(p).endswith(".safetensors"))
    return [p for p in paths if p.name.endswith(".steps.safetensors") == (kind == "steps")]


def labels_path(model_name: str) -> Path | None:
    """The shipped labels file (generated answers and grades, from ``valueprobe extract --labels``) of a model,
    so refits and ``valueprobe bench quality`` repeat only the prefill; ``None`` if none ships."""
    path = Path(str(files(__name__) / "labels" / f"{model_name.lower()}.jsonl"))
    return path if path.exists() else None
