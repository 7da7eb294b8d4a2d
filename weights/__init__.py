"""Shipped value-probe artifacts for real models (see ``weights/README.md``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEFAULT_ARTIFACT_NAME = "qwen2.5-coder-1.5b-instruct.safetensors"


def default_artifact() -> Path:
    """Path of the shipped default artifact (the one ``valueprobe serve`` and ``score`` use with no flags)."""
    return Path(str(files(__name__) / DEFAULT_ARTIFACT_NAME))


_SUFFIXES = {"steps": ".steps.safetensors", "answer": ".answer.safetensors"}


def shipped_artifacts(kind: str = "prompt") -> list[Path]:
    """Shipped artifacts of one kind: ``prompt`` (confidence in a prompt), ``answer`` (confidence in a given
    answer, ``*.answer.safetensors``) or ``steps`` (step values for search, ``*.steps.safetensors``)."""
    paths = sorted(Path(str(p)) for p in files(__name__).iterdir() if str(p).endswith(".safetensors"))
    if kind in _SUFFIXES:
        return [p for p in paths if p.name.endswith(_SUFFIXES[kind])]
    return [p for p in paths if not any(p.name.endswith(s) for s in _SUFFIXES.values())]


def answer_artifact_beside(prompt_artifact) -> Path | None:
    """The answer-level artifact fitted beside a prompt artifact (``<stem>.answer.safetensors``), if there is one."""
    path = Path(prompt_artifact)
    sibling = path.with_name(path.name.removesuffix(".safetensors") + ".answer.safetensors")
    return sibling if sibling.exists() else None


def _shipped(*parts: str) -> Path | None:
    """A file shipped in this package, if it is there."""
    path = Path(str(files(__name__).joinpath(*parts)))
    return path if path.exists() else None


def prompt_artifact_for(model_name: str) -> Path | None:
    """The shipped prompt-only artifact of a model (``<model>.safetensors``), if one ships."""
    return _shipped(f"{model_name.lower()}.safetensors")


def samples_path(model_name: str) -> Path | None:
    """The shipped sampled answers of a model (``labels/<model>.samples.jsonl``, for semantic entropy), if any."""
    return _shipped("labels", f"{model_name.lower()}.samples.jsonl")


def labels_path(model_name: str) -> Path | None:
    """The shipped labels file (generated answers and grades, from ``valueprobe extract --labels``) of a model,
    so refits and ``valueprobe bench quality`` repeat only the prefill; ``None`` if none ships."""
    return _shipped("labels", f"{model_name.lower()}.jsonl")


def labels_paths(model_name: str) -> list[Path]:
    """Every shipped labels file of a model: ``<model>.jsonl`` and the ones of later question sets
    (``<set>.<model>.jsonl``, e.g. ``transfer-open.``), not the sampled answers (``.samples.jsonl``)."""
    name = model_name.lower()
    folder = Path(str(files(__name__) / "labels"))
    return sorted(p for p in folder.glob("*.jsonl") if p.name == f"{name}.jsonl" or p.name.endswith(f".{name}.jsonl"))

