"""Confidence in the answer given: the answer_end artifact read at the answer's last token during generation
(no extra forward pass: the decode step that emits the end of the answer computes that state) equals the same
readout from one prefill of prompt + answer, for answers that end at the end-of-answer token, at the token limit
(one more decode step) and at a stop string, with batching."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import MIXED_PROMPTS

from valueprobe.plugin import ArtifactError, ValueProbe, load_artifact, save_artifact
from valueprobe.plugin.artifact import ArtifactData
from valueprobe.plugin.hooks import StepStateRecorder
from valueprobe.plugin.nexttoken import prompt_kind, summarize_logits
from valueprobe.plugin.probe import answer_end_column
from valueprobe.server.engines.base import Prompt, final_generation
from valueprobe.server.engines.transformers_engine import TransformersEngine


@pytest.fixture(scope="module")
def probe(artifact_file):
    return ValueProbe.load(artifact_file)


@pytest.fixture(scope="module", params=["last", "mean"])
def answer_probe(request, answer_artifact_file, tmp_path_factory):
    """The answer artifact as fitted (read at the answer's last token) and the same tensors marked
    ``answer_read: mean`` (the answer's tokens averaged, a running sum in the decoding hook): plumbing for the
    two reads, each checked against its own reference."""
    if request.param == "last":
        return ValueProbe.load(answer_artifact_file)
    data = load_artifact(answer_artifact_file)
    path = tmp_path_factory.mktemp("answer-mean") / "answer.mean.safetensors"
    save_artifact(ArtifactData(dict(data.tensors), {**data.metadata, "answer_read": "mean"}), path)
    probe = ValueProbe.load(path)
    assert probe.answer_read == "mean"
    return probe


def _prefill_readout(model, answer_probe, prompt_ids, answer_ids, kind, tokenizer):
    """The reference: one unpadded forward over prompt + answer, the layer read at every position and taken as
    the artifact reads it (the answer's last token, or the mean over the positions that fed its tokens; the prompt's
    last token for an empty answer), the answer's token log-probabilities and the prompt's next-token distribution
    from the same pass."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with torch.inference_mode(), StepStateRecorder(model, [answer_probe.layer], neuron_indices=answer_probe.neuron_indices,
                                                   dtype=torch.float32, all_positions=True) as rec:
        out = model(ids)
    states = rec.states()[answer_probe.layer][0]
    fed = states[len(prompt_ids):] if answer_ids else states[len(prompt_ids) - 1 :]
    values = fed[-1] if answer_probe.answer_read == "last" else fed.mean(dim=0)
    logp = torch.log_softmax(out.logits[0].float(), -1)
    lps = [float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(answer_ids)]
    first = summarize_logits(out.logits[0, len(prompt_ids) - 1 : len(prompt_ids)], answer_probe.letter_ids(tokenizer))
    return answer_probe.readout_answer(values[None], [lps], first, [kind])[0], lps


def test_answer_end_column_is_the_step_that_feeds_the_last_token():
    assert answer_end_column(0, 5) == 0          # empty answer: the prompt's last token
    assert answer_end_column(3, 5) == 3          # 3 tokens, then the end token emitted by forward 3
    assert answer_end_column(5, 5) is None       # stopped at the limit: the last token was never fed back


def test_generation_reads_the_answer_end_state_a_prefill_of_prompt_plus_answer_gives(qwen_model, tokenizer, probe,
                                                                                       answer_probe):
    prompts = [Prompt(tuple(probe.encode(tokenizer, [p])["input_ids"][0].tolist()), prompt_kind(p))
               for p in MIXED_PROMPTS]
    limits = [4 + (i % 3) for i in range(len(prompts))]

    async def main(eos=None, stop=None):
        engine = TransformersEngine(qwen_model, tokenizer, probe, max_batch_size=8)
        if eos is not None:  # a token the tiny random model does emit, as its end of answer: rows end early
            engine.eos_ids = set(engine.eos_ids) | {eos}
        await engine.start()
        try:
            return await asyncio.gather(*(final_generation(engine.generate(
                p, probe, max_new_tokens=n, temperature=0, stop=stop, answer_probe=answer_probe))
                for p, n in zip(prompts, limits)))
        finally:
            await engine.stop()

    at_limit = asyncio.run(main())
    assert {g.finish_reason for g in at_limit} == {"length"}
    # the second generated token of the first answer ends answers early wherever the model emits it
    second = at_limit[0].token_ids[1]
    ended = asyncio.run(main(eos=second))
    assert "stop" in {g.finish_reason for g in ended}
    cut = asyncio.run(main(stop=[at_limit[3].text[1:3]]))
    assert "stop" in {g.finish_reason for g in cut}
    checked = 0
    for gens in (at_limit, ended, cut):
        for p, g in zip(prompts, gens):
            assert g.answer is not None and g.token_logprobs is not None
            answer_ids = g.token_ids
            assert len(answer_ids) == len(g.token_logprobs)
            expected, lps = _prefill_readout(qwen_model, answer_probe, p.input_ids, answer_ids, p.kind, tokenizer)
            assert g.token_logprobs == pytest.approx(lps, abs=1e-4)
            assert g.answer.raw == pytest.approx(expected.raw, abs=1e-4)
            assert g.answer.probability == pytest.approx(expected.probability, abs=1e-4)
            assert g.answer.components["answer_tokens"] == len(answer_ids)
            assert g.answer.components["read_at"] == "last_token"  # at the limit too: one more step was run
            checked += 1
    assert checked == 3 * len(prompts)


def test_an_answer_artifact_is_refused_where_a_prompt_confidence_is_needed_and_its_stack_names_are_checked(
        answer_artifact_file, qwen_model, tokenizer):
    probe = ValueProbe.load(answer_artifact_file)
    assert probe.token_position == "answer_end"
    with pytest.raises(ArtifactError, match="token_position"):
        probe.score(qwen_model, tokenizer, ["What is 2+2?"])
    data = load_artifact(answer_artifact_file)
    md = dict(data.metadata)
    md["stack_features"] = '["value_raw", "logit_max_softmax", "entropy"]'
    with pytest.raises(ArtifactError, match="stack_features"):
        save_artifact(ArtifactData(dict(data.tensors), md), answer_artifact_file.parent / "bad.safetensors")
    # how the answer is read is part of the contract too: an unknown read, or a read on a prompt-level artifact
    with pytest.raises(ArtifactError, match="answer_read"):
        save_artifact(ArtifactData(dict(data.tensors), {**data.metadata, "answer_read": "median"}),
                      answer_artifact_file.parent / "bad.safetensors")


@pytest.mark.slow  # a wall-clock bench run end to end (its output is checked, not its timings)
def test_the_overhead_bench_times_each_variant_interleaved(qwen_model, tokenizer, probe, answer_probe):
    from valueprobe.bench.answer import measure_overhead

    lines = []
    result = measure_overhead(qwen_model, tokenizer, probe, answer_probe, reps=3, new_tokens=3, batch=3,
                              echo=lines.append)
    assert len(lines) == 5 and "both heads vs bare generate" in lines[-1] and "own cost" in lines[-2]
    assert set(result["seconds"]) == {"bare generate", "engine, prompt-only probe", "engine, both heads"}
    assert all(v["min"] > 0 for v in result["seconds"].values()) and result["both_heads_over_bare"]["median"] > 0


def test_plugin_users_score_answers_as_one_prefill_reads_them(qwen_model, tokenizer, probe, answer_probe):
    """ValueProbe.score_answers (the plugin's answer-level API, the same readout the sidecar serves answers
    generated elsewhere with) equals the reference: one unpadded forward over prompt + answer per answer."""
    answers = ["Paris", "Jupiter, the largest", "eight legs", "fox", "Rome"]
    got = answer_probe.score_answers(qwen_model, tokenizer, MIXED_PROMPTS, answers, batch_size=3)
    assert len(got) == len(answers)
    for p, a, r in zip(MIXED_PROMPTS, answers, got):
        prompt_ids = answer_probe.encode(tokenizer, [p])["input_ids"][0].tolist()
        expected, lps = _prefill_readout(qwen_model, answer_probe, prompt_ids,
                                         tokenizer(a, add_special_tokens=False)["input_ids"], prompt_kind(p), tokenizer)
        assert r.probability == pytest.approx(expected.probability, abs=1e-4)
        assert r.components["mean_token_logprob"] == pytest.approx(sum(lps) / len(lps), abs=1e-4)
        assert r.components["read_at"] == "last_token"
    with pytest.raises(ArtifactError, match="token_position"):
        probe.score_answers(qwen_model, tokenizer, MIXED_PROMPTS[:1], answers[:1])  # a prompt-only artifact
