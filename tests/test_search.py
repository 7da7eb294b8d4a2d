"""Value-guided step search on a tiny model with a planted value (one neuron of one layer): the values read while
candidates are generated equal a prefill's, value-beam keeps the best candidate of every round, the random
control does not, and best-of-n / self-consistency pick by value / by vote."""

import numpy as np
import pytest
import torch

from valueprobe.plugin.hooks import capture
from valueprobe.plugin.search import search

LAYER, NEURON = 2, 5


def planted_value(values: torch.Tensor) -> np.ndarray:
    return values[:, 0].numpy().astype(np.float64)  # the value is the planted neuron's activation


@pytest.fixture(scope="module")
def newline_model(tokenizer):
    from test_trajectories import _newline_prone

    return _newline_prone(tokenizer)


def prompt_ids(tokenizer, text="What is 2 plus 3?"):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prefill_value(model, ids):
    with torch.no_grad(), capture(model, [LAYER], [NEURON]) as cap:
        model(input_ids=torch.tensor([ids]))
    return float(cap.batches[0][LAYER][0, 0])


def test_value_beam_follows_the_planted_value_read_for_free(newline_model, tokenizer):
    p = prompt_ids(tokenizer)
    res = search(newline_model, tokenizer, p, layer=LAYER, neuron_indices=[NEURON], value=planted_value,
                 strategy="value-beam", width=4, max_steps=3, step_tokens=12, seed=0)
    assert res.rounds and res.tokens_generated > 0 and res.candidates_scored == sum(len(r) for r in res.rounds)
    kept_prefix: list[int] = []
    for round_ in res.rounds:
        values = [step.value for _, step in round_]
        assert all(v is not None for v in values)
        best_ids, best = max(round_, key=lambda c: c[1].value)
        # read while generating == read by a prefill of prompt + candidate
        for ids, step in round_:
            assert step.value == pytest.approx(prefill_value(newline_model, p + ids), abs=1e-4)
        assert best_ids[: len(kept_prefix)] == kept_prefix
        kept_prefix = best_ids
    assert [s.value for s in res.steps] == [max(s.value for _, s in r) for r in res.rounds]


def test_random_control_and_whole_answer_strategies(newline_model, tokenizer):
    p = prompt_ids(tokenizer)
    picked_best = []
    for seed in range(4):
        res = search(newline_model, tokenizer, p, layer=LAYER, neuron_indices=[NEURON], value=planted_value,
                     strategy="random", width=4, max_steps=2, step_tokens=12, seed=seed)
        picked_best += [res.steps[i].value == max(s.value for _, s in r) for i, r in enumerate(res.rounds)]
    assert not all(picked_best)  # a random step is not always the best one
    bon = search(newline_model, tokenizer, p, layer=LAYER, neuron_indices=[NEURON], value=planted_value,
                 strategy="best-of-n", width=3, answer_tokens=16, seed=0)
    assert bon.tokens_generated > 0 and bon.candidates_scored == 3
    sc = search(newline_model, tokenizer, p, layer=LAYER, neuron_indices=[NEURON], value=None,
                strategy="self-consistency", width=3, answer_tokens=16, extract=lambda t: t[:1], seed=0)
    assert sum(sc.votes.values()) <= 3
    with pytest.raises(ValueError):
        search(newline_model, tokenizer, p, layer=LAYER, neuron_indices=[NEURON], value=None, strategy="value-beam")


def test_served_search_returns_steps_with_values_streams_them_and_counts(artifact_file, tokenizer):
    from conftest import run_app

    from valueprobe.server.settings import Settings
    from test_trajectories import _newline_prone

    model = _newline_prone(tokenizer)
    settings = Settings(artifact=str(artifact_file), check_fingerprint=False)
    body = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_tokens": 32,
            "search": {"strategy": "value-beam", "width": 3, "max_steps": 2, "step_tokens": 8}}

    async def scenario(client, app):
        import asyncio

        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(3)))
        for r in answers:
            assert r.status_code == 200, r.text
            data = r.json()
            search = data["search"]
            assert search["strategy"] == "value-beam" and 1 <= len(search["steps"]) <= 2
            assert all(isinstance(s["value"], float) and 0 <= s["value"] <= 1 for s in search["steps"])
            assert search["candidates_scored"] >= 3 and data["usage"]["completion_tokens"] == search["tokens_generated"]
        plain = await client.post("/v1/chat/completions", json={**body, "search": None})
        assert plain.status_code == 200 and "search" not in plain.json()
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        import json

        events = [json.loads(line[6:]) for line in lines[:-1]]
        assert "confidence" in events[0] and any("search_step" in e for e in events)
        bad = await client.post("/v1/chat/completions", json={**body, "search": {"strategy": "magic"}})
        assert bad.status_code == 422
        metrics = (await client.get("/metrics")).text
        assert 'valueprobe_searches_total{strategy="value-beam"} 4.0' in metrics
        assert 'valueprobe_search_steps_total{strategy="value-beam"}' in metrics
        from prometheus_client.parser import text_string_to_metric_families

        batches = {s.name: s.value for f in text_string_to_metric_families(metrics)
                   if f.name == "valueprobe_search_batch_size" for s in f.samples}
        # 4 searches, and the 3 concurrent ones did not all run one by one: some shared a batch
        assert batches["valueprobe_search_batch_size_sum"] == 4
        assert batches["valueprobe_search_batch_size_count"] < 4

    run_app(settings, model, tokenizer, scenario, timeout=120)


def test_many_prompts_in_one_batch_continue_their_own_caches(newline_model, tokenizer):
    """Prompts of different lengths searched together: each candidate's value still equals a prefill of its own
    prompt + candidate (its cache was continued, left-padded beside others, across rounds), and greedy answers
    equal the one-prompt search's."""
    from valueprobe.plugin.search import search_many

    prompts = [prompt_ids(tokenizer, t) for t in ("What is 2 plus 3?", "Hi", "Count the sheep in the field, please.")]
    many = search_many(newline_model, tokenizer, prompts, layer=LAYER, neuron_indices=[NEURON], value=planted_value,
                       strategy="value-beam", width=3, max_steps=3, step_tokens=10, seed=1)
    assert len(many) == 3
    for p, res in zip(prompts, many):
        assert res.rounds
        for round_ in res.rounds:
            for ids, step in round_:
                assert step.value == pytest.approx(prefill_value(newline_model, p + ids), abs=1e-4)
    greedy = search_many(newline_model, tokenizer, prompts, layer=LAYER, neuron_indices=[NEURON], value=None,
                         strategy="greedy", answer_tokens=12)
    for p, res in zip(prompts, greedy):
        alone = search(newline_model, tokenizer, p, layer=LAYER, neuron_indices=[NEURON], value=None,
                       strategy="greedy", answer_tokens=12)
        assert res.text == alone.text and res.tokens_generated == alone.tokens_generated > 0


def test_value_sees_a_rounds_candidates_together(newline_model, tokenizer):
    """The value function gets each prompt's candidates of a round in one call, so a readout centred on them ranks
    them as the plain one does (same seed: same search)."""
    from valueprobe.plugin.search import search_many

    prompts = [prompt_ids(tokenizer, t) for t in ("What is 2 plus 3?", "Hi")]
    calls = []

    def centred(values):
        calls.append(len(values))
        v = planted_value(values)
        return v - v.mean()

    kwargs = dict(layer=LAYER, neuron_indices=[NEURON], strategy="value-beam", width=3, max_steps=3, step_tokens=10,
                  seed=2)
    plain = search_many(newline_model, tokenizer, prompts, value=planted_value, **kwargs)
    relative = search_many(newline_model, tokenizer, prompts, value=centred, **kwargs)
    assert calls and set(calls) == {3}
    for a, b in zip(plain, relative):
        assert a.text == b.text and [s.text for s in a.steps] == [s.text for s in b.steps]


def test_served_self_consistency_votes_with_the_measured_grader(artifact_file, newline_model, tokenizer):
    """The sidecar's search is the strategy the benchmark measured: same grader (final_answer, with its fallback to
    the last number), same votes and answer as search_many called the way bench search calls it."""
    import asyncio
    from types import SimpleNamespace

    from valueprobe.plugin import ValueProbe
    from valueprobe.plugin.search import final_answer, search_many
    from valueprobe.server.engines.base import Prompt
    from valueprobe.server.engines.transformers_engine import TransformersEngine

    probe = ValueProbe.load(artifact_file)
    spec = SimpleNamespace(strategy="self-consistency", width=3, beam=1, max_steps=2, step_tokens=8)
    ids = prompt_ids(tokenizer)

    async def served():
        engine = TransformersEngine(newline_model, tokenizer, probe)
        await engine.start()
        try:
            return await engine.search(Prompt(ids, ("open", 0)), probe, spec, temperature=0.8, seed=5)
        finally:
            await engine.stop()

    got = asyncio.run(served())
    (measured,) = search_many(newline_model, tokenizer, [ids], layer=probe.layer, neuron_indices=probe.neuron_indices,
                              value=probe.predict_proba, strategy="self-consistency", width=3, beam=1, max_steps=2,
                              step_tokens=8, answer_tokens=16, temperature=0.8, seed=5, extract=final_answer)
    assert got.votes and got.votes == measured.votes and got.text == measured.text
