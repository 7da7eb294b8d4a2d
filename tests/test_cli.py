"""`valueprobe fit`, `inspect` and `eval` end to end on a tiny config-built model saved as a local HF folder."""

from __future__ import annotations

import json
import random

import pytest
from conftest import build_model, build_tokenizer
from typer.testing import CliRunner

from valueprobe.cli import app
from valueprobe.plugin import ValueProbe

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    build_model("llama", len(tok), seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write_questions(path, seed, prefix):
    rng = random.Random(seed)
    words = "capital france planet largest fox lazy dog spider legs answer letter".split()
    with open(path, "w") as fh:
        for i in range(120):
            q = " ".join(rng.choices(words, k=rng.randint(3, 8))) + "?"
            if i % 3 == 2:  # open question with aliases
                fh.write(json.dumps({"id": f"{prefix}o{i}", "question": q, "answer": ["fox", "the fox"]}) + "\n")
            else:
                choices = rng.sample(words, 4)
                fh.write(json.dumps({"id": f"{prefix}c{i}", "question": q, "choices": choices,
                                     "answer": rng.randrange(4)}) + "\n")
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return _write_questions(tmp_path_factory.mktemp("data") / "qa.jsonl", 0, "a")


@pytest.fixture(scope="module")
def second_source(tmp_path_factory):
    return _write_questions(tmp_path_factory.mktemp("data2") / "qb.jsonl", 1, "b")


def test_fit_inspect_eval(model_dir, data_file, second_source, tmp_path):
    out = tmp_path / "tiny.safetensors"
    cache = tmp_path / "cache"
    args = ["fit", "--model", str(model_dir), "--data", str(data_file), "--data", str(second_source), "--out", str(out),
            "--cache", str(cache), "--max-new-tokens", "3", "--random-draws", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "served score" in result.output and "random" in result.output
    probe = ValueProbe.load(out)
    assert probe.model_name == str(model_dir)
    card = probe.eval_card
    names = {row["name"] for row in card["test"]["all"]}
    assert {"dense probe, same layer", "max-softmax", "neg. question length", "value neurons, calibrated"} <= names
    assert any(r["name"].startswith("next-token stack") for r in card["test"]["choice"])
    # leave-one-source-out: one row per source, neurons chosen without it; k and head chosen by it
    assert set(card["loso"]["rows"]) == {"qa", "qb"} and card["selection"]["criterion"].startswith("leave-one-source-out")
    assert all("random_mean" in r and "ood_auroc" in r for r in card["loso"]["rows"].values())
    assert card["served_score"] in ("stacked", "value") and probe.served_score == card["served_score"]
    assert card["splits"]["n_test"] > 0 and card["selection"]["k_curve"]
    assert (tmp_path / "tiny.md").exists() and (tmp_path / "tiny.plots" / "reliability.png").exists()
    assert "Leave-one-source-out" in (tmp_path / "tiny.md").read_text()

    # the cache makes a rerun skip extraction: same artifact content
    shards = sorted(p.name for p in cache.rglob("shard-*"))
    again = runner.invoke(app, args[:7] + ["--out", str(tmp_path / "again.safetensors"), "--cache", str(cache),
                                           "--max-new-tokens", "3", "--random-draws", "5"])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in cache.rglob("shard-*")) == shards
    assert ValueProbe.load(tmp_path / "again.safetensors").neuron_indices.tolist() == probe.neuron_indices.tolist()

    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "Eval card" in shown.output and f"k={probe.k}" in shown.output

    preds = tmp_path / "preds.jsonl"
    evaluated = runner.invoke(app, ["eval", "--artifact", str(out), "--cache", str(cache), "--max-new-tokens", "3",
                                    "--predictions", str(preds)])
    assert evaluated.exit_code == 0, evaluated.output
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == card["splits"]["n_test"]
    assert {"id", "label", "probability", "raw", "value_probability", "served_score", "ood", "max-softmax",
            "neg. question length"} <= set(lines[0])


def test_answer_level_extract_fit_and_eval(model_dir, data_file, second_source, tmp_path):
    """extract (answers kept in a labels file) -> fit --answer-end (no generation: one pass per question) -> eval
    --answer-artifact, whose per-item output carries the answer, its probability and the answer-side baselines."""
    cache, labels = tmp_path / "cache", tmp_path / "labels.jsonl"
    common = ["--model", str(model_dir), "--data", str(data_file), "--data", str(second_source), "--cache", str(cache),
              "--max-new-tokens", "3"]
    assert runner.invoke(app, ["extract", *common, "--labels", str(labels)]).exit_code == 0
    prompt, answer = tmp_path / "prompt.safetensors", tmp_path / "prompt.answer.safetensors"
    fitted = runner.invoke(app, ["fit", *common, "--labels", str(labels), "--out", str(prompt), "--random-draws", "5"])
    assert fitted.exit_code == 0, fitted.output
    fitted = runner.invoke(app, ["fit", *common, "--labels", str(labels), "--out", str(answer), "--random-draws", "5",
                                 "--answer-end", "--prompt-artifact", str(prompt)])
    assert fitted.exit_code == 0, fitted.output
    probe = ValueProbe.load(answer)
    assert probe.token_position == "answer_end" and probe.eval_card["token_position"] == "answer_end"
    names = {row["name"] for row in probe.eval_card["test"]["all"]}
    assert {"answer sum log-prob", "answer min token log-prob", "prompt-only served score"} <= names
    assert all("baseline:answer sum log-prob" in r for r in probe.eval_card["loso"]["rows"].values())
    preds = tmp_path / "preds.jsonl"
    evaluated = runner.invoke(app, ["eval", "--artifact", str(prompt), "--answer-artifact", str(answer), "--cache",
                                    str(cache), "--labels", str(labels), "--predictions", str(preds)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "confidence in the answers given" in evaluated.output
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert lines and all(0 <= x["answer_probability"] <= 1 and x["answer"] is not None for x in lines)
    assert {"answer sum log-prob", "answer min token log-prob", "answer mean token log-prob"} <= set(lines[0])
    refused = runner.invoke(app, ["eval", "--artifact", str(answer), "--cache", str(cache)])
    assert refused.exit_code == 2 and "token_position" in refused.output


def test_cli_errors_are_clear(tmp_path, model_dir):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2 and "error:" in result.output
    result = runner.invoke(app, ["fit", "--model", str(model_dir), "--data", "nosuch:12", "--out", str(bad)])
    assert result.exit_code == 2 and "unknown data spec" in result.output


def test_ablate_runs_and_hook_changes_outputs(model_dir, data_file, tmp_path):
    import torch

    from valueprobe.calibration.ablate import ablate_neurons, magnitude_matched
    from valueprobe.plugin import load_model

    out = tmp_path / "a.safetensors"
    fit = runner.invoke(app, ["fit", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--cache",
                              str(tmp_path / "c"), "--max-new-tokens", "2", "--random-draws", "2"])
    assert fit.exit_code == 0, fit.output
    result_path = tmp_path / "ablate.json"
    res = runner.invoke(app, ["ablate", "--artifact", str(out), "--data", f"{data_file}:40", "--seeds", "2",
                              "--out", str(result_path)])
    assert res.exit_code == 0, res.output
    result = json.loads(result_path.read_text())
    assert result["n"] > 0 and len(result["random_drops"]) == 2 and 0 < result["p_empirical_vs_random"] <= 1
    # the ablation hook really edits the residual stream, and leaves no hook behind
    model, tok = load_model(str(model_dir))
    enc = tok(["capital of france?"], return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
        with ablate_neurons(model, 1, list(range(32))):
            during = model(**enc).logits
        after = model(**enc).logits
    assert not torch.allclose(before, during) and torch.equal(before, after)
    # magnitude matching picks distinct neurons outside the value set
    rng = __import__("numpy").random.default_rng(0)
    picks = magnitude_matched([0, 1, 2], __import__("numpy").arange(32.0), rng)
    assert len(set(picks.tolist())) == 3 and not set(picks.tolist()) & {0, 1, 2}


@pytest.mark.slow  # a wall-clock bench run end to end (its output is checked, not its timings)
def test_bench_perf_and_quality_smoke(model_dir, data_file, tmp_path):
    """The benchmark commands run end to end (numbers from a tiny random model mean nothing)."""
    out = tmp_path / "b.safetensors"
    fit = runner.invoke(app, ["fit", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--cache",
                              str(tmp_path / "c"), "--max-new-tokens", "2", "--random-draws", "2"])
    assert fit.exit_code == 0, fit.output
    perf = runner.invoke(app, ["bench", "perf", "--artifact", str(out), "--reps", "1", "--new-tokens", "2"])
    assert perf.exit_code == 0, perf.output
    assert "overhead" in perf.output and "readout" in perf.output and "batch 16" in perf.output
    timed = runner.invoke(app, ["bench", "perf", "--artifact", str(out), "--reps", "1", "--new-tokens", "2",
                                "--model", str(model_dir), "--random-weights", "--dtype", "bfloat16"])
    assert timed.exit_code == 0, timed.output
    assert "overhead" in timed.output and "bfloat16" in timed.output
    quality = runner.invoke(app, ["bench", "quality", "--artifact", str(out), "--cache", str(tmp_path / "c"),
                                  "--out", str(tmp_path / "q")])
    assert quality.exit_code == 0, quality.output
    assert "measured now" in quality.output and "refitted now" in quality.output
    assert (tmp_path / "q" / "quality.md").exists()


@pytest.mark.slow  # a wall-clock bench run end to end (its output is checked, not its timings)
def test_bench_soak_smoke(model_dir, data_file, second_source, tmp_path):
    """The soak benchmark runs end to end against a real sidecar process (tiny model, a few seconds)."""
    out = tmp_path / "s.safetensors"
    fit = runner.invoke(app, ["fit", "--model", str(model_dir), "--data", str(data_file), "--data", str(second_source),
                              "--out", str(out), "--cache", str(tmp_path / "c"), "--max-new-tokens", "2",
                              "--random-draws", "2"])
    assert fit.exit_code == 0, fit.output
    soak = runner.invoke(app, ["bench", "soak", "--model", str(model_dir), "--artifact", str(out), "--clients", "4",
                               "--seconds", "6", "--max-tokens", "2", "--max-queue", "4"])
    assert soak.exit_code == 0, soak.output
    assert "reload 200" in soak.output and "disconnected mid-stream" in soak.output
    assert "other 5xx: 0" in soak.output and "never answered: 0" in soak.output


@pytest.mark.parametrize("variable,value", [("VALUEPROBE_DEVICE", "gpu"), ("VALUEPROBE_DTYPE", "int8")])
def test_serve_refuses_a_bad_device_or_dtype_before_loading_anything(variable, value):
    result = runner.invoke(app, ["serve"], env={variable: value})
    assert result.exit_code != 0
    assert variable.removeprefix("VALUEPROBE_").lower() in result.output


def test_a_dopamine_ablation_record_names_its_study(tmp_path):
    import hashlib
    import json

    from valueprobe.calibration.ablate import study_provenance

    study = tmp_path / "dopamine.json"
    study.write_text(json.dumps({"n_traces": 8, "n_problems": 2, "layer": 3, "dopamine": {"neurons": [1, 2]}}))
    p = study_provenance(study)
    assert p == {"file": str(study), "sha256": hashlib.sha256(study.read_bytes()).hexdigest(), "n_traces": 8,
                 "n_problems": 2, "layer": 3}


def test_heap_fragmentation_limit_applies_on_glibc_and_yields_to_the_environment(monkeypatch):
    import sys

    from valueprobe.calibration.trajectories import limit_heap_fragmentation

    if sys.platform.startswith("linux"):
        assert limit_heap_fragmentation() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_heap_fragmentation() is False  # the user's own setting wins


def test_bench_answer_refuses_inputs_of_another_model_and_names_the_field(answer_artifact_file, artifact_file,
                                                                          tmp_path):
    """A prompt artifact, previous answer artifact or samples file of another model would be read against the wrong
    model (0.5B answer artifact + the 1.5B default: an IndexError at layer 24 before this check): refused before
    any model is loaded, the field named, with --overhead-only too; a samples file that is not there is said."""
    from valueprobe.plugin import ArtifactData, load_artifact, save_artifact

    data = load_artifact(artifact_file)
    other = tmp_path / "other-model.safetensors"
    save_artifact(ArtifactData(dict(data.tensors), {**data.metadata, "model_name": "another-model"}), other)
    result = runner.invoke(app, ["bench", "answer", "--answer-artifact", str(answer_artifact_file),
                                 "--prompt-artifact", str(other), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "model_name is 'another-model'" in result.output, result.output
    answer = load_artifact(answer_artifact_file)
    previous = tmp_path / "previous-other-model.safetensors"
    save_artifact(ArtifactData(dict(answer.tensors), {**answer.metadata, "model_name": "another-model"}), previous)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"id": "q1", "answers": ["a", "b"], "model_name": "another-model"}) + "\n")
    base = ["bench", "answer", "--answer-artifact", str(answer_artifact_file), "--prompt-artifact", str(artifact_file),
            "--cache", str(tmp_path / "cache")]
    for extra, says in ((["--previous-artifact", str(previous)], "previous artifact's model_name is 'another-model'"),
                        (["--samples", str(samples)], "samples' model_name is ['another-model']"),
                        (["--samples", str(tmp_path / "none.jsonl")], "no such samples file"),
                        (["--previous-artifact", str(previous), "--overhead-only", "--overhead-reps", "1"],
                         "previous artifact's model_name")):  # --overhead-only is checked too
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and says in result.output, (extra, result.output)
