"""Commands about one artifact: `inspect`, `score`, `restamp`, `eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import app, fail, load_model, load_probe, probe_and_model


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact (.safetensors) to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw metadata as JSON.")] = False,
):
    """Print an artifact's metadata and eval card (validates the whole file first)."""
    from valueprobe.calibration.evaluate import render_markdown

    probe = load_probe(artifact, position=None)
    md = probe.data.metadata
    if as_json:
        typer.echo(json.dumps({k: (json.loads(v) if k in ("eval_card", "thresholds", "prompt_format", "model_fingerprint",
                                                          "tokenizer_fingerprint", "library_versions") else v) for k, v in md.items()},
                              indent=2, sort_keys=True))
        return
    typer.echo(f"artifact      {artifact}  (id {probe.artifact_id}, format {md['format_version']})")
    typer.echo(f"model         {md['model_name']}")
    typer.echo(f"layer         {probe.layer} ({md['hook_point']}, {md['token_position']})")
    typer.echo(f"neurons       k={probe.k} of {probe.hidden_size} ({100 * probe.k / probe.hidden_size:.2f}%)")
    typer.echo(f"head          {probe.head}, calibrator {probe.calibrator}, objective {md['objective']}")
    typer.echo(f"served score  {probe.served_score}" + (f" (stacked per kind: {', '.join(probe.stack_kinds)})"
                                                       if probe.served_score == "stacked" else ""))
    typer.echo(f"prompt format {md['prompt_format']}")
    if probe.thresholds:
        from valueprobe.server.policy import fitted_choices

        typer.echo(f"thresholds    {json.dumps(probe.thresholds, sort_keys=True)}")
        for line in fitted_choices(probe.thresholds):  # what `serve` does with each fitted value
            typer.echo(f"  serve {line}")
    if probe.eval_card:
        typer.echo("")
        if probe.token_position == "step_end":
            from valueprobe.calibration.step_value import render_markdown as render_steps

            typer.echo(render_steps(probe.eval_card))
        else:
            typer.echo(render_markdown(probe.eval_card))


@app.command()
def score(
    prompts: Annotated[list[str], typer.Argument(help="Questions to score (prompt-only, no generation).")],
    artifact: Annotated[Optional[Path], typer.Option(help="Artifact; default: the shipped default.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model name or folder; default: the artifact's model.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 (fastest on CPU), bfloat16 or float16.")] = "float32",
    check_fingerprint: Annotated[bool, typer.Option(help="Refuse a model whose fingerprint differs.")] = True,
):
    """Score questions with an artifact: prints raw score and calibrated P(correct) per question."""
    probe, mdl, tok = probe_and_model(artifact, model, dtype, strict=check_fingerprint)
    results = probe.score(mdl, tok, list(prompts), check_fingerprint=False)  # checked (or waived) just above
    for prompt, r in zip(prompts, results):
        typer.echo(f"{r.probability:.3f}  (raw {r.raw:+.3f})  {prompt}")


@app.command()
def restamp(
    artifact: Annotated[Path, typer.Argument(help="Artifact (.safetensors) whose fingerprint to record anew.")],
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of replacing ARTIFACT.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model name or folder; default: the artifact's model.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 (fastest on CPU), bfloat16 or float16.")] = "float32",
):
    """Record an artifact's tokenizer fingerprint in the current scheme, for the checkpoint it was fitted on.

    For artifacts stamped before scheme 2, whose fingerprint hashed special-token attributes that transformers
    releases read differently from one checkpoint. Refused unless the layer weights, config, vocabulary and chat
    template all match; tensors, card and thresholds are kept (a new content hash, ``restamped_from`` the old)."""
    from valueprobe.plugin import FingerprintMismatchError

    probe = load_probe(artifact, position=None)
    mdl, tok = load_model(model or probe.model_name, dtype)
    try:
        fresh = probe.restamped(mdl, tok)
    except FingerprintMismatchError as exc:
        fail(str(exc))
    fresh.save(out or artifact)
    typer.echo(f"restamped {artifact} (id {probe.artifact_id}, scheme {probe.fingerprint_scheme}) -> {out or artifact} "
               f"(id {fresh.artifact_id}, scheme {fresh.fingerprint_scheme})")


@app.command(name="eval")
def eval_(
    artifact: Annotated[Optional[Path], typer.Option(help="Artifact; default: the shipped default.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Data spec(s); default: the artifact's test split data.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model; default: the artifact's own model.")] = None,
    predictions: Annotated[Optional[Path], typer.Option(help="Write one JSON line per item here.")] = None,
    cache: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path("runs/cache"),
    batch_size: int = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens for open questions (default: the fit's).")] = 16,
    seed: int = 0,
    dtype: str = "float32",
    test_split_only: Annotated[bool, typer.Option(help="Keep only questions in the artifact's test split.")] = True,
    labels: Annotated[Optional[Path], typer.Option(help="Labels JSONL of answers generated earlier (see `extract`): "
                                                   "those questions need a prefill only.")] = None,
    check_fingerprint: Annotated[bool, typer.Option(help="Refuse a model whose fingerprint differs (default: on "
                                                    "for the artifact's own model).")] = True,
    answer_artifact: Annotated[Optional[Path], typer.Option(help="Also score confidence in each answer with this "
                                                            "answer-level artifact (`fit --answer-end`): one more "
                                                            "pass per question, no generation.")] = None,
    route_to_artifact: Annotated[Optional[Path], typer.Option(help="The big model's prompt-only artifact to route "
                                                              "to: each --predictions record also gets route_gain = "
                                                              "P_big - P_small (P_small answer-level with "
                                                              "--answer-artifact, else prompt-only), the score "
                                                              "escalation orders by (higher first). Loads the big "
                                                              "model after this one: a prefill per question, open "
                                                              "answers generated unless --route-labels holds the "
                                                              "big model's; cache <cache>/route-big.")] = None,
    route_labels: Annotated[Optional[Path], typer.Option(help="Labels JSONL of the big model's answers (see "
                                                         "`extract`) for --route-to-artifact: its open questions "
                                                         "then need a prefill only.")] = None,
):
    """Score an artifact on labelled data: labels come from the model on the artifact's prompt format.

    With no --data, the artifact's own test split (data specs, split seed and fractions recorded in its card).
    """
    from valueprobe.calibration.data import DataError, load_data
    from valueprobe.calibration.evaluate import (artifact_test_questions, evaluate_answers, evaluate_artifact,
                                                 format_table, prediction_records)
    from valueprobe.calibration.extract import load_labels

    probe = load_probe(artifact)
    if route_to_artifact is not None and predictions is None:
        fail("--route-to-artifact writes route_gain into the --predictions records: give --predictions")
    route_probe = load_probe(route_to_artifact) if route_to_artifact is not None else None
    try:
        if data and not test_split_only:
            questions = [q for spec in data for q in load_data(spec, seed=seed)]
        else:
            questions = artifact_test_questions(probe, data, seed=seed)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    probe, mdl, tok = probe_and_model(probe, model, dtype, check_fingerprint=check_fingerprint)
    max_new = probe.eval_card.get("config", {}).get("extra", {}).get("max_new_tokens", max_new_tokens)
    known = load_labels(labels, model_name=probe.model_name) if labels else None
    rows, fs, pred = evaluate_artifact(probe, mdl, tok, questions, cache_dir=cache, batch_size=batch_size,
                                       max_new_tokens=max_new, labels=known)
    typer.echo(f"{len(fs.labels)} questions, model accuracy {fs.labels.mean():.3f}")
    typer.echo(format_table(rows))
    answer_fs = answer_pred = None
    if answer_artifact is not None:
        answer_probe = load_probe(answer_artifact, position="answer_end")
        answer_probe.check_compatible(mdl, tok, strict=check_fingerprint)
        answer_rows, answer_fs, answer_pred = evaluate_answers(answer_probe, mdl, tok, fs, questions, cache_dir=cache,
                                                               batch_size=batch_size, max_new_tokens=max_new)
        typer.echo("confidence in the answers given:")
        typer.echo(format_table(answer_rows))
    if predictions:
        records = prediction_records(probe, fs, pred, answer_fs, answer_pred)
        if route_probe is not None:
            mdl = None  # let the small model go before the big one loads
            records = _route_records(records, route_probe, questions, answer_level=answer_fs is not None,
                                     specs=data or probe.eval_card.get("config", {}).get("extra", {}).get("data_specs"),
                                     seed=seed, dtype=dtype, check_fingerprint=check_fingerprint, cache=cache,
                                     batch_size=batch_size, max_new_tokens=max_new_tokens, labels=route_labels or labels)
        predictions.write_text("".join(json.dumps(rec) + "\n" for rec in records))
        typer.echo(f"wrote {predictions}")


def _route_records(records, big_probe, questions, *, answer_level: bool, specs, seed: int, dtype: str,
                   check_fingerprint: bool, cache: Path, batch_size: int, max_new_tokens: int, labels):
    """``records`` with route_gain: the big model evaluated with its artifact on the same questions (its own cache
    folder), then merged by id. Warns when some questions were fitted or calibrated on by the big artifact."""
    import gc

    from valueprobe.calibration.data import DataError
    from valueprobe.calibration.evaluate import (add_route_gain, artifact_test_questions, evaluate_artifact,
                                                 route_big_probabilities)
    from valueprobe.calibration.extract import load_labels

    try:
        held_out = {q.id for q in artifact_test_questions(big_probe, specs, seed=seed)}
        seen = sum(q.id not in held_out for q in questions)
        if seen:
            typer.secho(f"warning: {seen} of {len(questions)} questions are in the big artifact's train or calibration "
                        "split: its P_big there is optimistic", fg=typer.colors.YELLOW, err=True)
    except (DataError, ValueError) as exc:
        typer.secho(f"warning: could not check the big artifact's split ({exc})", fg=typer.colors.YELLOW, err=True)
    gc.collect()
    big_probe, big_mdl, big_tok = probe_and_model(big_probe, None, dtype, check_fingerprint=check_fingerprint)
    max_new = big_probe.eval_card.get("config", {}).get("extra", {}).get("max_new_tokens", max_new_tokens)
    known = load_labels(labels, model_name=big_probe.model_name) if labels else None
    _, big_fs, big_pred = evaluate_artifact(big_probe, big_mdl, big_tok, questions, cache_dir=cache / "route-big",
                                            batch_size=batch_size, max_new_tokens=max_new, labels=known or None)
    typer.echo(f"route: {big_probe.model_name} accuracy {big_fs.labels.mean():.3f} on the same questions")
    try:
        return add_route_gain(records, route_big_probabilities(big_fs, big_pred), answer_level=answer_level)
    except ValueError as exc:
        fail(str(exc), code=1)
