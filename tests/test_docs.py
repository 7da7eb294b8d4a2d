"""The docs name nothing the code lacks: every ``--flag``, route, ``valueprobe`` command and ``VALUEPROBE_*`` setting
named in README.md, ARCHITECTURE.md and every docs/*.md exists (flags and commands from the typer app, routes from the FastAPI app,
settings from :class:`Settings`). Names that belong to other tools are listed here with whose they are. Also:
docs/reference.md is what ``scripts/gen_reference.py`` writes from the code today, and every relative link in the docs
points at a file (or a heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "ARCHITECTURE.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

#: docs that name routes, where finding none means the extraction broke
DOCS_WITH_ROUTES = {"README.md", "docs/deploy.md", "docs/sidecar.md", "docs/guardrails.md", "docs/reference.md"}
#: flags of other tools the docs name, with whose they are
FOREIGN_FLAGS = {
    "--no-deps": "pip install",
    "--models": "scripts/setup.sh",
    "--api-key": "vLLM's and TGI's (docs/deploy.md says the sidecar has none)",
}
#: paths the docs name that are base URLs, not routes
BASE_URLS = {"/v1": "the OpenAI-compatible base URL clients and --escalate-url are given"}
#: settings read from the environment outside Settings
OTHER_ENV = {"VALUEPROBE_CACHE": "plugin/models.py: where models are assembled and converted"}


def _code_spans(text: str) -> list[str]:
    """Inline code spans and fenced code blocks: where the docs name flags, routes and commands."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    return fenced + re.findall(r"`([^`\n]+)`", rest)


def _cli():
    import typer.main

    from valueprobe.cli import app

    return typer.main.get_command(app)


def _cli_flags_and_commands() -> tuple[set[str], set[str]]:
    flags, commands = {"--help"}, set()

    def walk(command, path):
        if path:
            commands.add(" ".join(path))
        for param in getattr(command, "params", []):
            flags.update(o for o in [*param.opts, *getattr(param, "secondary_opts", [])] if o.startswith("--"))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(_cli(), [])
    return flags, commands


def _routes() -> set[str]:
    from prometheus_client import CollectorRegistry

    from valueprobe.server.app import create_app
    from valueprobe.server.settings import Settings

    return {route.path for route in create_app(Settings(), registry=CollectorRegistry()).routes}


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_the_docs_name_exists(doc):
    text = (ROOT / doc).read_text()
    flags, _ = _cli_flags_and_commands()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    missing = sorted(named - flags - set(FOREIGN_FLAGS))
    assert not missing, f"{doc} names flags no valueprobe command has: {missing}"
    assert "--models" in (ROOT / "scripts/setup.sh").read_text()
    serve = _cli().commands["serve"]
    assert not any("--api-key" in p.opts for p in serve.params), "the docs say serve has no --api-key"


@pytest.mark.parametrize("doc", DOCS)
def test_every_route_the_docs_name_exists(doc):
    text = (ROOT / doc).read_text()
    routes = _routes()
    named = set()
    for span in _code_spans(text):
        named.update(re.findall(r"^(?:(?:GET|POST) )?(/[A-Za-z0-9_./*{}-]*)", span))
        named.update(re.findall(r"localhost:\d+(/[A-Za-z0-9_./-]*)", span))
        named.update(re.findall(r"127\.0\.0\.1:\d+(/[A-Za-z0-9_./-]*)", span))
    missing = []
    for path in sorted(named):
        path = path.split("?")[0].rstrip(".")
        if path in routes or path in BASE_URLS:
            continue
        if path.endswith("*") and any(r.startswith(path[:-1]) for r in routes):
            continue
        missing.append(path)
    if doc in DOCS_WITH_ROUTES:
        assert named, f"{doc}: no route found (the extraction is broken)"
    assert not missing, f"{doc} names routes the app does not serve: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_and_setting_the_docs_name_exists(doc):
    from valueprobe.server.settings import Settings

    text = (ROOT / doc).read_text()
    _, commands = _cli_flags_and_commands()
    missing = []
    for span in _code_spans(text):
        for words in re.findall(r"(?:^|[\s;&(])(?:\.venv/bin/)?valueprobe((?: [a-z][a-z-]*){1,2})", span):
            words = words.split()
            if " ".join(words) not in commands and words[0] not in commands:
                missing.append(" ".join(words))
            elif words[0] == "bench" and len(words) > 1 and " ".join(words) not in commands:
                missing.append(" ".join(words))
    assert not missing, f"{doc} names valueprobe commands that do not exist: {sorted(set(missing))}"
    settings = {f"VALUEPROBE_{name.upper()}" for name in Settings.model_fields}
    named = set(re.findall(r"VALUEPROBE_[A-Z0-9_]*[A-Z0-9]", text))
    unknown = sorted(n for n in named - settings - set(OTHER_ENV) if not n.endswith("_"))
    assert not unknown, f"{doc} names settings that do not exist: {unknown}"


def test_the_docs_list_covers_every_doc():
    assert {"README.md", "docs/deploy.md", "docs/reference.md", "docs/sidecar.md"} <= set(DOCS)


def test_reference_is_generated_from_the_code():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs/reference.md").read_text() == gen.render(), \
        "docs/reference.md is out of date: run .venv/bin/python scripts/gen_reference.py"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_in_the_docs_resolves(doc):
    text = (ROOT / doc).read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / doc).parent / path if path else ROOT / doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)}
            if anchor not in anchors:
                broken.append(target)
    assert not broken, f"{doc} links to what does not exist: {broken}"
