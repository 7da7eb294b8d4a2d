"""Scoring prompts and attaching the probe inside generate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from valueprobe.plugin import PromptError, ValueProbe
from valueprobe.plugin.artifact import ArtifactData
from valueprobe.plugin.hooks import capture, with_position_ids


@pytest.fixture()
def probe(fitted):
    data, *_ = fitted
    return ValueProbe(ArtifactData(dict(data.tensors), dict(data.metadata)))


def test_score_matches_manual_readout(probe, qwen_model, tokenizer):
    prompts = ["What is the capital of France?", {"question": "Which planet is largest?", "choices": ["Mars", "Jupiter"]},
               [{"role": "user", "content": "Answer with the letter only."}]]
    results = probe.score(qwen_model, tokenizer, prompts, batch_size=2)
    assert len(results) == 3
    for prompt, result in zip(prompts, results):
        text = probe.prompt_format.render(tokenizer, prompt)
        enc = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad(), capture(qwen_model, [probe.layer], probe.neuron_indices) as cap:
            qwen_model(**enc)
        expected = probe.readout(cap.batches[0][probe.layer])[0]
        assert result.raw == pytest.approx(expected.raw, abs=1e-4)
        assert result.probability == pytest.approx(expected.probability, abs=1e-4)
        assert 0.0 <= result.probability <= 1.0
    # one prompt (not a list) works too
    assert len(probe.score(qwen_model, tokenizer, "What is the capital of France?")) == 1


def test_bad_prompts_raise_clear_errors(probe, qwen_model, tokenizer):
    with pytest.raises(PromptError, match="empty"):
        probe.score(qwen_model, tokenizer, ["   "])
    with pytest.raises(PromptError, match="role"):
        probe.score(qwen_model, tokenizer, [[{"content": "no role"}]])
    with pytest.raises(PromptError, match="unsupported"):
        probe.score(qwen_model, tokenizer, [42])


def test_attach_scores_generate_prefill_once(probe, qwen_model, tokenizer):
    prompts = ["What is the capital of France?", "Which planet is largest?"]
    expected = probe.score(qwen_model, tokenizer, prompts)
    seen = []
    with probe.attach(qwen_model, tokenizer, on_score=seen.append) as handle:
        enc = probe.encode(tokenizer, prompts)
        qwen_model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert len(handle.consume()) == 1 and len(seen) == 1
        for got, want in zip(handle.latest, expected):
            assert got.probability == pytest.approx(want.probability, abs=1e-4)
    assert not handle.attached
    handle.remove()  # idempotent
    # after removal nothing is recorded
    with torch.no_grad():
        qwen_model(**with_position_ids(probe.encode(tokenizer, prompts)))
    assert len(seen) == 1


def test_readout_shape_check(probe):
    with pytest.raises(ValueError, match="shape"):
        probe.raw_scores(torch.zeros(2, probe.k + 1))
    assert probe.predict_proba(torch.zeros(4, probe.k)).shape == (4,)
    assert np.all(np.isfinite(probe.raw_scores(torch.randn(3, probe.k) * 1e3)))
