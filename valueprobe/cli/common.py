"""What every command shares: the typer apps, failing with a message, and the one place that loads an artifact and
its model (with the fingerprint check)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="valueprobe: calibrated confidence for LLM answers from a sparse set of value neurons.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that print measured ratios (quality, perf).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def fail(message: str, code: int = 2):
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input; 1: could not run)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def load_probe(path: Path | str | None, position: Optional[str] = "last_prompt_token"):
    """Load and validate an artifact (default: the shipped default); with ``position``, refuse one read at another
    token position. A bad artifact exits with its reason."""
    from valueprobe.plugin import ArtifactError, ValueProbe
    from valueprobe.weights import default_artifact

    try:
        probe = ValueProbe.load(path or default_artifact())
        if position is not None:
            probe.require_position(position)
        return probe
    except ArtifactError as exc:
        fail(str(exc))


def load_model(name: str, dtype: str = "float32"):
    """``(model, tokenizer)`` of a known name, a local folder or a hub name, on every core; a model whose packages
    are not installed exits with how to install them."""
    import torch

    from valueprobe.plugin.models import ModelNotInstalledError
    from valueprobe.plugin.models import load_model as load

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        return load(name, dtype=dtype)
    except ModelNotInstalledError as exc:
        fail(str(exc))


def probe_and_model(artifact, model: Optional[str], dtype: str = "float32", *, check_fingerprint: bool = True,
                    strict: Optional[bool] = None, position: Optional[str] = "last_prompt_token"):
    """``(probe, model, tokenizer)``: the artifact (a path, a loaded ``ValueProbe``, or ``None`` for the shipped
    default) and the model it names (or ``model``).

    By default (``strict=None``) the fingerprint is checked strictly for the artifact's own model (unless
    ``check_fingerprint`` is off) and with a warning only for a model the user names, so an artifact can be tried on
    a near relative on purpose; ``strict`` True or False decides for both."""
    from valueprobe.plugin import FingerprintMismatchError, ValueProbe

    probe = artifact if isinstance(artifact, ValueProbe) else load_probe(artifact, position)
    mdl, tok = load_model(model or probe.model_name, dtype)
    try:
        probe.check_compatible(mdl, tok, strict=(check_fingerprint and model is None) if strict is None else strict)
    except FingerprintMismatchError as exc:
        fail(str(exc))
    return probe, mdl, tok
