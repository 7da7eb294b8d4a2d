"""Semantic entropy: answer-equivalence clustering, the entropy over clusters (discrete and likelihood-weighted),
and resumable sampling on a tiny model."""

import math

import pytest

from valueprobe.calibration.data import Question
from valueprobe.calibration.semantic import cluster_answers, equivalent, load_samples, sample_answers, semantic_entropy


def test_equivalence_is_normalised_containment():
    assert equivalent("Homer", "homer.") and equivalent("Homer", "The poet Homer")
    assert not equivalent("Homer", "Homeric") and not equivalent("Paris", "Rome")
    assert equivalent("", "") and not equivalent("", "Paris")


def test_clusters_and_entropies():
    answers = ["Paris", "paris, France", "Rome", "The city of Paris", "Lyon"]
    assert cluster_answers(answers) == [0, 0, 1, 0, 2]
    p = [3 / 5, 1 / 5, 1 / 5]
    assert semantic_entropy(answers) == pytest.approx(-sum(x * math.log(x) for x in p))
    assert semantic_entropy(["a", "a", "a"]) == 0.0
    # likelihood-weighted: a very likely 'Rome' sample dominates
    w = semantic_entropy(answers, [-5.0, -5.0, 0.0, -5.0, -5.0])
    assert w < semantic_entropy(answers)
    with pytest.raises(ValueError):
        semantic_entropy([])


def test_sampling_is_resumable_and_records_each_sample(qwen_model, tokenizer, tmp_path):
    from valueprobe.plugin.prompting import PromptFormat

    qs = [Question(f"q{i}", f"capital {i}?", ["x"], None, "open", "toy") for i in range(3)]
    out = tmp_path / "samples.jsonl"
    done = sample_answers(qwen_model, tokenizer, qs[:2], PromptFormat(), out, model_name="tiny", n_samples=3,
                          max_new_tokens=4, rows_per_batch=6, progress=False)
    assert set(done) == {"q0", "q1"}
    done = sample_answers(qwen_model, tokenizer, qs, PromptFormat(), out, model_name="tiny", n_samples=3,
                          max_new_tokens=4, rows_per_batch=6, progress=False)
    assert set(done) == {"q0", "q1", "q2"} and len(out.read_text().splitlines()) == 3
    rec = load_samples(out)["q2"]
    assert len(rec["answers"]) == len(rec["logprobs"]) == len(rec["tokens"]) == 3
    assert all(lp <= 0 for lp in rec["logprobs"]) and rec["temperature"] == 1.0
    with pytest.raises(ValueError):
        sample_answers(qwen_model, tokenizer, qs, PromptFormat(), tmp_path / "x.jsonl", model_name="t", n_samples=1)


def test_a_resumed_run_draws_the_same_samples_as_an_uninterrupted_one(qwen_model, tokenizer, tmp_path):
    """Batches are appended whole, so a run stopped after its first batch resumes at the next batch's first question;
    seeded by that question (not by its offset in the shrinking to-do list), it draws what one run would have."""
    from valueprobe.plugin.prompting import PromptFormat

    qs = [Question(f"q{i}", f"capital {i}?", ["x"], None, "open", "toy") for i in range(4)]
    args = dict(model_name="tiny", n_samples=3, max_new_tokens=4, rows_per_batch=6, progress=False)
    whole = sample_answers(qwen_model, tokenizer, qs, PromptFormat(), tmp_path / "whole.jsonl", **args)
    sample_answers(qwen_model, tokenizer, qs[:2], PromptFormat(), tmp_path / "resumed.jsonl", **args)  # one batch
    resumed = sample_answers(qwen_model, tokenizer, qs, PromptFormat(), tmp_path / "resumed.jsonl", **args)
    assert {q: r["answers"] for q, r in resumed.items()} == {q: r["answers"] for q, r in whole.items()}
