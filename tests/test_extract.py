"""Extraction speed-ups must not change the numbers: shared-prefix KV reuse, waves, batched generation, labels file."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_model
from valueprobe.calibration.data import Question
from valueprobe.calibration.extract import (SharedPrefix, extract_answer_end, extract_features, load_labels,
                                           save_labels)
from valueprobe.plugin.prompting import PromptFormat

QUESTIONS = [
    Question("c1", "What is the capital of France?", 0, ["Paris", "Rome", "Oslo", "Bern"], "choice", "toy-mc"),
    Question("c2", "Which planet is largest?", 2, ["Mars", "Venus", "Jupiter"], "choice", "toy-mc"),
    Question("c3", "How many legs does a spider have? The quick brown fox.", 1, ["six", "eight"], "choice", "toy-mc"),
    Question("o1", "What is the capital of France?", ["Paris"], None, "open", "toy-open"),
    Question("o2", "How many legs does a spider have?", ["eight"], None, "open", "toy-open"),
    Question("o3", "Which planet is the largest planet in the solar system?", ["Jupiter"], None, "open", "toy-open"),
]


@pytest.mark.parametrize("family,attn", [("qwen2", "eager"), ("qwen2", "sdpa"), ("llama", "sdpa")])
def test_shared_prefix_gives_the_same_features_and_labels(tokenizer, family, attn):
    model = build_model(family, len(tokenizer))
    model.config._attn_implementation = attn
    fmt = PromptFormat(system="You are a careful assistant.")
    plain = extract_features(model, tokenizer, QUESTIONS, fmt, reuse_prefix=False, batch_size=2, generate_batch_size=2,
                             max_new_tokens=4, progress=False)
    cached = extract_features(model, tokenizer, QUESTIONS, fmt, reuse_prefix=True, batch_size=3, generate_batch_size=3,
                              max_new_tokens=4, progress=False)
    assert all(r["prefix_cached"] for r in cached.rows) and not any(r["prefix_cached"] for r in plain.rows)
    torch.testing.assert_close(cached.features, plain.features, rtol=1e-4, atol=1e-5)
    for a, b in zip(plain.rows, cached.rows):
        assert a["prediction"] == b["prediction"] and a["label"] == b["label"]
        assert a["max_softmax"] == pytest.approx(b["max_softmax"], rel=1e-4)
        assert a["option_entropy"] == pytest.approx(b["option_entropy"], rel=1e-4, abs=1e-6)


def test_shared_prefix_is_the_template_head(tokenizer, qwen_model):
    fmt = PromptFormat(system="You are a careful assistant.")
    prefix = SharedPrefix(qwen_model, tokenizer, fmt, torch.device("cpu"))
    head = tokenizer.decode(prefix.ids)
    assert head.startswith("<|im_start|>system") and "careful assistant" in head and "user" in head
    assert len(prefix.layers) == 3
    # A prompt that does not start with the prefix (chat messages of another shape) is not matched.
    other = tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert not prefix.matches(other)


def test_labels_file_replaces_generation(tokenizer, qwen_model, tmp_path):
    fmt = PromptFormat()
    first = extract_features(qwen_model, tokenizer, QUESTIONS, fmt, max_new_tokens=4, progress=False)
    path = tmp_path / "labels.jsonl"
    assert save_labels(first.rows, path, model_name="tiny", max_new_tokens=4) == 3
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["o1", "o2", "o3"] and all("prediction" in x for x in lines)
    # Plant a different label: the second run must take it from the file instead of generating.
    labels = load_labels(path, model_name="tiny")
    labels["o1"] = {**labels["o1"], "label": 1 - labels["o1"]["label"], "prediction": "planted"}
    second = extract_features(qwen_model, tokenizer, QUESTIONS, fmt, max_new_tokens=4, labels=labels, progress=False)
    by_id = {r["id"]: r for r in second.rows}
    assert by_id["o1"]["prediction"] == "planted" and not by_id["o1"]["generated"]
    torch.testing.assert_close(second.features, first.features, rtol=1e-4, atol=1e-5)
    assert load_labels(path, model_name="another-model") == {}


def test_waves_keep_the_given_order_resumable(tokenizer, qwen_model, tmp_path):
    fmt = PromptFormat()
    part = extract_features(qwen_model, tokenizer, QUESTIONS[:2] + QUESTIONS[3:4], fmt, cache_dir=tmp_path,
                            max_new_tokens=4, wave_size=2, progress=False)
    full = extract_features(qwen_model, tokenizer, QUESTIONS, fmt, cache_dir=tmp_path, max_new_tokens=4, wave_size=2,
                            progress=False)
    assert [r["id"] for r in full.rows] == [q.id for q in QUESTIONS]
    torch.testing.assert_close(full.features[[0, 1, 3]], part.features)
    assert all(r["seconds"] >= 0 for r in full.rows)


def test_answer_end_reads_the_state_and_log_probabilities_of_prompt_plus_answer(qwen_model, tokenizer):
    """Read at the answer's end: every layer equals a plain forward over prompt + answer at its last token, and
    the answer-side signals are the answer tokens' own log-probabilities in that pass; shared prefix and
    batching change nothing."""
    fmt = PromptFormat()
    prompt_only = extract_features(qwen_model, tokenizer, QUESTIONS, fmt, max_new_tokens=4, progress=False)
    labels = {r["id"]: r for r in prompt_only.rows}
    answers = {r["id"]: r["prediction"] if r["kind"] == "choice" else "Paris, the city" for r in prompt_only.rows}
    runs = [extract_features(qwen_model, tokenizer, QUESTIONS, fmt, labels=labels, answers=answers, batch_size=b,
                             reuse_prefix=reuse, progress=False) for b, reuse in ((1, False), (4, True))]
    torch.testing.assert_close(runs[0].features, runs[1].features, atol=1e-4, rtol=1e-4)
    letter_ids = fmt.letter_token_ids(tokenizer, len(fmt.letters))
    for i, q in enumerate(QUESTIONS):
        prompt = tokenizer(fmt.render(tokenizer, q.prompt()), add_special_tokens=False)["input_ids"]
        answer = ([letter_ids[fmt.letters.index(answers[q.id])]] if q.kind == "choice"
                  else tokenizer(answers[q.id], add_special_tokens=False)["input_ids"])
        with torch.inference_mode():
            out = qwen_model(torch.tensor([prompt + answer]), output_hidden_states=True)
        # hidden_states[-1] has the final norm applied; the hook reads the raw block output (layers 1..L-1 here)
        expected = torch.stack([h[0, -1] for h in out.hidden_states[1:-1]])
        torch.testing.assert_close(runs[1].features[i, :-1], expected, atol=1e-4, rtol=1e-4)
        logp = torch.log_softmax(out.logits[0].float(), -1)
        chosen = torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer)])
        row = runs[1].rows[i]
        assert row["answer"] == answers[q.id] and row["answer_tokens"] == len(answer)
        assert row["answer_mean_logprob"] == pytest.approx(float(chosen.mean()), abs=1e-4)
        assert row["answer_min_logprob"] == pytest.approx(float(chosen.min()), abs=1e-4)
        assert row["label"] == labels[q.id]["label"] and row["question_tokens"] == len(prompt)
        assert row["max_softmax"] == pytest.approx(labels[q.id]["max_softmax"], abs=1e-4)  # still at the prompt's end
        # pooled reads of the answer's tokens (issue 31): the mean over the answer's positions and the state at the
        # position that read its least likely token, in the same pass
        states = torch.stack([h[0, len(prompt):] for h in out.hidden_states[1:-1]], dim=1)  # [answer, L-1, H]
        pooled = runs[1].pooled
        torch.testing.assert_close(pooled["answer_mean"][i, :-1], states.mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pooled["answer_min_token"][i, :-1], states[int(chosen.argmin())],
                                   atol=1e-4, rtol=1e-4)
        if len(answer) == 1:
            torch.testing.assert_close(pooled["answer_mean"][i], runs[1].features[i])
    assert len(set(len(r["token_logprobs"]) for r in runs[1].rows)) > 1  # a test with only one-token answers proves little


def test_answer_end_refuses_a_letter_the_model_did_not_choose(qwen_model, tokenizer):
    fmt = PromptFormat()
    rows = extract_features(qwen_model, tokenizer, QUESTIONS[:1], fmt, progress=False).rows
    other = next(letter for letter in "ABCD" if letter != rows[0]["prediction"])
    with pytest.raises(ValueError, match="the model chose"):
        extract_features(qwen_model, tokenizer, QUESTIONS[:1], fmt, answers={"c1": other}, progress=False)


def test_one_answer_pass_fills_both_caches(qwen_model, tokenizer, tmp_path):
    """``extract_answer_end`` runs one pass: the prompt-end states it writes to the prompt-only cache equal a
    prompt-only extraction's, and reading both sets again from the cache runs no forward pass."""
    fmt = PromptFormat()
    prompt_only = extract_features(qwen_model, tokenizer, QUESTIONS, fmt, max_new_tokens=4, progress=False)
    labels = {r["id"]: {**r, "prediction": "Paris"} for r in prompt_only.rows if r["kind"] == "open"}
    prompt, answer = extract_answer_end(qwen_model, tokenizer, QUESTIONS, fmt, labels=labels, cache_dir=tmp_path,
                                        max_new_tokens=4, batch_size=4, progress=False)
    torch.testing.assert_close(prompt.features, prompt_only.features, atol=1e-4, rtol=1e-4)
    assert [r["prediction"] for r in prompt.rows if r["kind"] == "choice"] == \
        [r["answer"] for r in answer.rows if r["kind"] == "choice"]
    assert all(r["answer"] == "Paris" for r in answer.rows if r["kind"] == "open")
    calls = []
    handle = qwen_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = extract_answer_end(qwen_model, tokenizer, QUESTIONS, fmt, labels=labels, cache_dir=tmp_path,
                                   max_new_tokens=4, progress=False)
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(again[1].features, answer.features)
    for name, value in answer.pooled.items():  # the pooled reads come back from the cache too
        torch.testing.assert_close(again[1].pooled[name], value)


def test_a_second_writer_to_one_cache_is_refused_and_a_reader_is_not(qwen_model, tokenizer, tmp_path):
    import fcntl

    fmt = PromptFormat()
    first = extract_features(qwen_model, tokenizer, QUESTIONS[:2], fmt, cache_dir=tmp_path, progress=False)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    with open(folder / ".writer.lock", "w") as held:  # another process's extraction, mid-run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        again = extract_features(qwen_model, tokenizer, QUESTIONS[:2], fmt, cache_dir=tmp_path, progress=False)
        torch.testing.assert_close(again.features, first.features)  # all cached: reading needs no lock
        with pytest.raises(ValueError, match="another extraction is writing"):
            extract_features(qwen_model, tokenizer, QUESTIONS[:3], fmt, cache_dir=tmp_path, progress=False)
