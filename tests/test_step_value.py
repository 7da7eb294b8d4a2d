"""Trajectory mode of `valueprobe fit` (a value over reasoning steps, token_position step_end) on synthetic traces
with a planted value neuron: the artifact is written with a card comparing TD and final-reward heads, is refused
for prompt scoring (naming token_position), and values the sidecar's search when given as --search-artifact."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from valueprobe.cli import app
from valueprobe.plugin import ValueProbe
from valueprobe.plugin.artifact import ArtifactMismatchError

LAYER, NEURON = 2, 3


@pytest.fixture(scope="module")
def step_setup(tmp_path_factory, tokenizer):
    from test_trajectories import _newline_prone

    folder = tmp_path_factory.mktemp("steps")
    model = _newline_prone(tokenizer)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    width = model.config.hidden_size
    rng = np.random.default_rng(0)
    traces, saved = [], {}
    for p in range(40):
        skill = rng.normal()
        for s in range(4):
            steps = int(rng.integers(2, 5))
            logit = np.cumsum(rng.normal(skill, 1.0, steps + 1))
            label = int(rng.random() < 1 / (1 + np.exp(-logit[-1])))
            x = rng.normal(0, 1, (steps + 1, width))
            x[:, NEURON] = 3 * logit
            tid = f"p{p}#{s}"
            traces.append({"id": tid, "problem": f"p{p}", "dataset": "toy", "sample": s, "gold": "1",
                           "prediction": "1" if label else "2", "label": label, "truncated": False,
                           "steps": [f"step {i}" for i in range(steps)], "step_ends": list(range(steps)),
                           "tokens": list(range(steps + 1)), "model_name": "tiny"})
            saved[tid] = torch.tensor(x, dtype=torch.float16)[:, None, :]
    (folder / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    (folder / "states").mkdir()
    save_file(saved, str(folder / "states" / "states-toy.safetensors"), metadata={"layers": json.dumps([LAYER])})
    out = folder / "steps.safetensors"
    result = CliRunner().invoke(app, ["fit-steps", "--model", str(folder / "model"), "--traces", str(folder / "traces.jsonl"),
                                      "--states", str(folder / "states"), "--layer", str(LAYER), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return model, out, result.output


def test_fit_traces_writes_a_step_value_artifact_with_its_card(step_setup):
    _, out, output = step_setup
    probe = ValueProbe.load(out)
    assert probe.token_position == "step_end" and probe.layer == LAYER and probe.head == "mlp"
    assert "TD" in output and "final-reward regression" in output
    card = probe.eval_card
    assert card["objective"] == "td" and card["data"]["traces"] == 160
    held = card["held_out"]["by_objective"]
    assert held["td"]["auroc_all_states"] > 0.7 and held["bce"]["auroc_all_states"] > 0.7  # the planted value
    assert (out.parent / "steps.md").read_text().startswith("# Step value")
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "step_end" in shown.output and "| TD |" in shown.output


def test_step_value_is_refused_for_prompts_naming_token_position(step_setup, tokenizer):
    model, out, _ = step_setup
    probe = ValueProbe.load(out)
    with pytest.raises(ArtifactMismatchError, match="token_position"):
        probe.attach(model, tokenizer)
    with pytest.raises(ArtifactMismatchError, match="token_position"):
        probe.score(model, tokenizer, "What is 2 plus 3?")
    result = CliRunner().invoke(app, ["fit", "--model", "x", "--out", str(out)])  # a prompt confidence needs data
    assert result.exit_code != 0 and "--data" in result.output
    result = CliRunner().invoke(app, ["score", "2 plus 3?", "--artifact", str(out), "--model", "x"])
    assert result.exit_code != 0 and "token_position" in result.output


def test_served_search_is_valued_by_the_step_artifact(step_setup, artifact_file, tokenizer):
    from conftest import run_app

    from valueprobe.server.settings import Settings

    model, out, _ = step_setup
    step_id = ValueProbe.load(out).artifact_id
    body = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_tokens": 16,
            "search": {"strategy": "value-beam", "width": 2, "max_steps": 2, "step_tokens": 6}}

    async def scenario(client, app):
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["search"]["value_artifact"] == step_id

    run_app(Settings(artifact=str(artifact_file), search_artifact=str(out), check_fingerprint=False), model,
            tokenizer, scenario, timeout=120)

    async def refused(client, app):
        r = await client.get("/readyz")
        assert r.status_code == 503 and "token_position" in r.text

    run_app(Settings(artifact=str(out), check_fingerprint=False), model, tokenizer, refused)


def test_trace_ablation_compares_the_chosen_neurons_with_magnitude_matched_random_sets(tokenizer):
    from test_trajectories import _newline_prone

    from valueprobe.calibration.ablate import _trace_nll, trace_ablation_study
    from valueprobe.calibration.data import Question
    from valueprobe.calibration.trajectories import TRACE_FORMAT

    model = _newline_prone(tokenizer)
    problems = {f"p{i}": Question(f"p{i}", f"What is {i} plus {i}?", str(2 * i), None, "numeric", "toy") for i in range(3)}
    traces = []
    for i in range(3):
        tokens = tokenizer(f"{i} plus {i}\nis {2 * i}\nAnswer: {2 * i}", add_special_tokens=False)["input_ids"]
        traces.append({"problem": f"p{i}", "tokens": tokens, "step_ends": [2, 5, len(tokens) - 1]})
    width = model.config.hidden_size
    states = [np.random.default_rng(i).normal(size=(4, width)) for i in range(3)]
    base = _trace_nll(model, tokenizer, TRACE_FORMAT, traces, problems)
    # teacher-forced NLL of the trace tokens, checked by hand for the first trace
    prompt = tokenizer(TRACE_FORMAT.render(tokenizer, problems["p0"].prompt()),
                       add_special_tokens=TRACE_FORMAT.adds_special_tokens(tokenizer))["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + traces[0]["tokens"]])).logits[0], -1)
    manual = -np.mean([float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(traces[0]["tokens"])])
    assert base[0, 0] == pytest.approx(manual, rel=1e-4)
    r = trace_ablation_study(model, tokenizer, traces, problems, layer=2, neurons=list(range(0, width, 2)),
                             states=states, fmt=TRACE_FORMAT, seeds=2, mode="zero", progress=False)
    assert r["k"] == width // 2 and len(r["random_sets"]) == 2
    for subset in r["random_sets"]:
        assert len(subset) == width // 2 and not set(subset) & set(range(0, width, 2))
    assert r["delta_nll_chosen"][0] != 0  # zeroing half the layer changes the predictions
    assert all(0 < p <= 1 for p in r["p_empirical_vs_random"])


def test_dopamine_study_reads_several_trace_files_as_one(step_setup, tmp_path):
    """`valueprobe dopamine --traces a --traces b` (GSM8K and gym traces, say) studies every trace of both."""
    _, out, _ = step_setup
    folder = out.parent
    lines = (folder / "traces.jsonl").read_text().splitlines(keepends=True)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(lines[:80]))
    second.write_text("".join(lines[80:]))
    result = CliRunner().invoke(app, ["dopamine", "--traces", str(first), "--traces", str(second), "--states",
                                      str(folder / "states"), "--random-draws", "5", "--out", str(tmp_path / "dop")])
    assert result.exit_code == 0, result.output
    study = json.loads((tmp_path / "dop.json").read_text())
    assert (study["n_traces"], study["n_problems"], study["layer"]) == (160, 40, LAYER)
