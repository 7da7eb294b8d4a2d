"""The ``valueprobe`` command line: thin typer commands over library functions, one module per family.

``common`` holds the apps and the one place that loads an artifact and its model; ``artifacts`` (inspect, score,
restamp, eval), ``fitting`` (extract, fit, fit-steps), ``studies`` (sample-answers, traces, dopamine, ablate,
ablate-dopamine), ``serving`` (serve) and ``bench`` (bench ...) register their commands on import. Each command
parses options, calls one library function and prints; the logic is importable without the CLI.
"""

from __future__ import annotations

import logging

from . import artifacts, bench, fitting, serving, studies  # noqa: F401 - importing registers the commands
from .common import app, bench_app

__all__ = ["app", "bench_app", "main"]


def main():  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app()
