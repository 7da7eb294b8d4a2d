"""Write docs/reference.md from the code: the sidecar's settings (server/settings.py), the ``valueprobe serve`` flags
and every other command (the typer app), and the FastAPI app's routes. No model is loaded: the app is built and its
routes read, its lifespan never entered.

    .venv/bin/python scripts/gen_reference.py           # rewrite docs/reference.md
    .venv/bin/python scripts/gen_reference.py --check   # exit 1 when docs/reference.md is out of date

tests/test_docs.py regenerates it in memory and compares."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference.md"
HIDDEN_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # FastAPI's own pages


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in args)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " \\| ".join(_type(a) for a in inner) + (" (optional)" if len(inner) < len(args) else "")
    return getattr(annotation, "__name__", str(annotation))


def _default(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value!r}`"


def settings_table() -> list[str]:
    from valueprobe.server.settings import Settings

    rows = ["| setting | environment | type | default | description |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "(required)" if field.is_required() else _default(field.get_default(call_default_factory=True))
        rows.append(f"| `{name}` | `VALUEPROBE_{name.upper()}` | {_type(field.annotation)} | {default} | "
                    f"{_cell(field.description or '')} |")
    return rows


def _cli():
    import typer.main

    from valueprobe.cli import app

    return typer.main.get_command(app)


def serve_flags_table() -> list[str]:
    from valueprobe.server.settings import Settings

    serve = _cli().commands["serve"]
    rows = ["| flag | setting | help |", "|---|---|---|"]
    for param in serve.params:
        opts = [o for o in [*param.opts, *getattr(param, "secondary_opts", [])] if o.startswith("-")]
        if not opts:
            continue
        setting = f"`VALUEPROBE_{param.name.upper()}`" if param.name in Settings.model_fields else "—"
        rows.append(f"| {' / '.join(f'`{o}`' for o in opts)} | {setting} | {_cell(getattr(param, 'help', '') or '')} |")
    return rows


def commands_table() -> list[str]:
    rows = ["| command | what |", "|---|---|"]

    def walk(command, path):
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            if getattr(sub, "hidden", False):
                continue
            words = [*path, name]
            text = (sub.help or sub.short_help or "").strip().split("\n\n")[0]
            rows.append(f"| `valueprobe {' '.join(words)}` | {_cell(text)} |")
            walk(sub, words)

    walk(_cli(), [])
    return rows


def routes_table() -> list[str]:
    from prometheus_client import CollectorRegistry

    from valueprobe.server.app import create_app
    from valueprobe.server.settings import Settings

    app = create_app(Settings.model_construct(), registry=CollectorRegistry())
    rows = ["| method | path | handler | summary |", "|---|---|---|---|"]
    seen = []
    for route in app.routes:
        path = getattr(route, "path", None)
        if path is None or path in HIDDEN_ROUTES:
            continue
        methods = [m for m in sorted(getattr(route, "methods", None) or []) if m != "HEAD"]
        endpoint = getattr(route, "endpoint", None)
        handler = getattr(endpoint, "__name__", None) or getattr(route, "name", None) or type(endpoint).__name__
        doc = (getattr(route, "summary", None) or getattr(route, "description", None)
               or (endpoint.__doc__ if endpoint is not None and callable(endpoint) and handler != type(endpoint).__name__
                   else "") or "")
        summary = doc.strip().split("\n\n")[0].replace("``", "`")
        if not methods:  # a plain Starlette route around an ASGI app (the Prometheus exposition) takes any method
            methods, summary = ["any"], summary or "Prometheus text exposition (an ASGI app mounted as a route)."
        seen.append((path, ", ".join(methods), f"`{handler}`", summary))
    for path, methods, handler, summary in sorted(seen):
        rows.append(f"| {methods} | `{path}` | {handler} | {_cell(summary)} |")
    return rows


def render() -> str:
    parts = [
        "# Reference: settings, flags, commands and routes",
        "",
        "[README](../README.md) · [deploy](deploy.md) · [sidecar](sidecar.md)",
        "",
        "Generated from the code by `scripts/gen_reference.py`; do not edit by hand "
        "(`tests/test_docs.py` fails when this file differs from what the script writes).",
        "",
        "## Settings of `valueprobe serve`",
        "",
        "Each is read from `VALUEPROBE_<NAME>` in the environment, a `.env` file, or a `--config` file; the flags "
        "below set the ones they name. Defaults are those of `server/settings.py`.",
        "",
        *settings_table(),
        "",
        "## `valueprobe serve` flags",
        "",
        *serve_flags_table(),
        "",
        "## Commands",
        "",
        *commands_table(),
        "",
        "## Routes",
        "",
        "Every route the sidecar's FastAPI app serves (FastAPI's own `/docs`, `/redoc` and `/openapi.json` aside); "
        "the summary is the handler's docstring. What each answers: [sidecar.md](sidecar.md#routes), "
        "[guardrails.md](guardrails.md).",
        "",
        *routes_table(),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run scripts/gen_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
