"""The transformers engine's batched generation: generations that wait together run as one batched ``generate``,
and each answer (text, tokens, finish reason, confidence) is the one it gets alone; a row the policy stops at
prefill stops without stopping the others; a seeded sample runs alone."""

from __future__ import annotations

import asyncio

import pytest
from conftest import MIXED_PROMPTS
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from valueprobe.plugin import ValueProbe
from valueprobe.plugin.nexttoken import prompt_kind
from valueprobe.server.engines.base import Prompt, final_generation
from valueprobe.server.engines.transformers_engine import TransformersEngine
from valueprobe.server.metrics import SidecarMetrics


@pytest.fixture(scope="module")
def probe(artifact_file):
    return ValueProbe.load(artifact_file)


def _prompts(tokenizer, probe):
    return [Prompt(tuple(probe.encode(tokenizer, [p])["input_ids"][0].tolist()), prompt_kind(p)) for p in MIXED_PROMPTS]


def _batch_sizes(metrics: SidecarMetrics) -> dict:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text)
            if f.name == "valueprobe_generation_batch_size" for s in f.samples}


def test_concurrent_generations_share_a_batch_and_each_gets_its_own_answer(qwen_model, tokenizer, probe):
    prompts = _prompts(tokenizer, probe)
    limits = [3 + 2 * (i % 4) for i in range(len(prompts))]  # different lengths and token limits in one batch
    metrics = SidecarMetrics(CollectorRegistry())

    async def main():
        engine = TransformersEngine(qwen_model, tokenizer, probe, max_batch_size=8, metrics=metrics)
        await engine.start()
        try:
            alone = [await final_generation(engine.generate(p, probe, max_new_tokens=n, temperature=0))
                     for p, n in zip(prompts, limits)]
            solo = _batch_sizes(metrics)
            refused = []

            class Policy:  # the third prompt is "not answered": its row stops at prefill, the others go on
                def __init__(self, i):
                    self.i = i

                def decide(self, p):
                    refused.append(self.i) if self.i == 2 else None
                    return "abstain" if self.i == 2 else "answer"

            async def whole(i, p, n):  # the stream folded, as the sidecar folds a whole answer
                events = engine.generate(p, probe, max_new_tokens=n, temperature=0, policy=Policy(i))
                head = await anext(events)
                return head.decision, await final_generation(events)

            decided = await asyncio.gather(*(whole(i, p, n) for i, (p, n) in enumerate(zip(prompts, limits))))
            together = [g for _, g in decided]
            assert [d for d, _ in decided] == ["abstain" if i == 2 else "answer" for i in range(len(prompts))]
            return alone, solo, together, refused
        finally:
            await engine.stop()

    alone, solo, together, refused = asyncio.run(main())
    assert solo["valueprobe_generation_batch_size_count"] == len(prompts)  # awaited one by one: batches of 1
    sizes = _batch_sizes(metrics)
    n_batches = sizes["valueprobe_generation_batch_size_count"] - len(prompts)
    assert sizes["valueprobe_generation_batch_size_sum"] == 2 * len(prompts) and n_batches < len(prompts) / 2
    assert refused == [2]
    for i, (a, b) in enumerate(zip(alone, together)):
        assert b.confidence.probability == pytest.approx(a.confidence.probability, abs=1e-5)
        assert b.prompt_tokens == a.prompt_tokens
        if i == 2:
            assert b.finish_reason == "aborted" and b.completion_tokens <= 1
            continue
        assert (b.text, b.completion_tokens, b.finish_reason) == (a.text, a.completion_tokens, a.finish_reason)
        assert b.completion_tokens <= limits[i]
    assert any(a.finish_reason == "length" and a.completion_tokens == n for a, n in zip(alone, limits))


def test_a_seeded_sample_runs_alone_and_repeats(qwen_model, tokenizer, probe):
    prompts = _prompts(tokenizer, probe)[:4]
    metrics = SidecarMetrics(CollectorRegistry())

    async def main():
        engine = TransformersEngine(qwen_model, tokenizer, probe, metrics=metrics)
        await engine.start()
        try:
            runs = []
            for _ in range(2):
                runs.append(await asyncio.gather(*(final_generation(
                    engine.generate(p, probe, max_new_tokens=6, temperature=1.0, seed=7)) for p in prompts)))
            unseeded = await asyncio.gather(*(final_generation(engine.generate(p, probe, max_new_tokens=6,
                                                                               temperature=1.0)) for p in prompts))
            return runs, unseeded
        finally:
            await engine.stop()

    runs, unseeded = asyncio.run(main())
    assert [g.text for g in runs[0]] == [g.text for g in runs[1]]
    sizes = _batch_sizes(metrics)
    # 8 seeded generations in batches of 1, then the 4 unseeded ones share fewer than 4 batches
    assert sizes["valueprobe_generation_batch_size_sum"] == 12
    assert 8 < sizes["valueprobe_generation_batch_size_count"] < 12
    assert all(g.completion_tokens <= 6 for g in unseeded)


def test_a_search_whose_states_are_not_finite_fails_alone(qwen_model, tokenizer, probe):
    """Searches batched together: the one whose states overflow (NaN) fails with a named probe error and streams no
    NaN step; the others are answered with finite values (sampling their candidates is not upset by its NaN row)."""
    from conftest import poisoned

    from valueprobe.server.errors import ProbeFailedError
    from valueprobe.server.protocol import SearchSpec

    clean = _prompts(tokenizer, probe)[:3]
    bad = Prompt(tuple(probe.encode(tokenizer, ["zebra zebra?"])["input_ids"][0].tolist()), ("open", 0))
    spec = SearchSpec(strategy="value-beam", width=2, max_steps=2, step_tokens=4)
    streamed: list = []

    async def main():
        engine = TransformersEngine(qwen_model, tokenizer, probe, max_batch_size=8)
        await engine.start()
        try:
            return await asyncio.gather(*(engine.search(p, probe, spec, on_step=streamed.append if p is bad else None)
                                          for p in [*clean, bad]), return_exceptions=True)
        finally:
            await engine.stop()

    with poisoned(qwen_model, tokenizer):
        *ok, failed = asyncio.run(main())
    assert isinstance(failed, ProbeFailedError) and "not finite" in str(failed)
    assert streamed == []
    for result in ok:
        assert not isinstance(result, Exception), result
        assert result.steps and all(s.value is None or 0 <= s.value <= 1 for s in result.steps)


def test_both_engines_implement_the_declared_engine_contract():
    """The sidecar holds an EngineClient and reads capabilities from it, never probing with hasattr."""
    from valueprobe.server.engines.base import EngineClient
    from valueprobe.server.engines.vllm_engine import VllmEngine

    members = {n for n in vars(EngineClient) if not n.startswith("_")} | {"supports_search", "supports_answer_confidence",
                                                                        "supports_answer_scoring", "supports_logprobs"}
    assert {"score", "generate", "search", "attach", "context_length", "tokenize_answer"} <= members
    assert "generate_stream" not in members  # one engine stream for whole and streamed answers
    for cls in (TransformersEngine, VllmEngine):
        assert not [m for m in members if not hasattr(cls, m)], cls
    # the whole contract, not the names only: each method's parameters (names, order, kinds) and what it is
    # (a coroutine, an async stream, a plain call) as EngineClient declares them
    import inspect

    def shape(fn):
        kind = ("stream" if inspect.isasyncgenfunction(fn) else "coroutine" if inspect.iscoroutinefunction(fn)
                else "call")
        return kind, [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]

    declared = {n: m for n, m in vars(EngineClient).items() if not n.startswith("_") and inspect.isfunction(m)}
    assert declared["generate"] and shape(TransformersEngine.generate)[0] == "stream"
    for cls in (TransformersEngine, VllmEngine):
        for name, member in declared.items():
            want, got = shape(member), shape(getattr(cls, name))
            if want[0] == "call" and name == "generate":  # the Protocol declares the stream as a plain def
                want = ("stream", want[1])
            assert got == want, (cls.__name__, name, got, want)
    assert TransformersEngine.supports_search and not VllmEngine.supports_search


def test_admission_refuses_beyond_the_limit_and_frees_its_slot_on_error():
    from valueprobe.server.engines.base import Admission
    from valueprobe.server.errors import OverloadedError

    admission = Admission(2, "generations")
    with admission.slot(), admission.slot():
        with pytest.raises(OverloadedError, match="too many generations"):
            with admission.slot():
                pass
    with pytest.raises(RuntimeError):
        with admission.slot():
            raise RuntimeError("a failed request")
    assert admission.in_flight == 0


def test_streamed_generations_share_a_batch_and_their_pieces_are_the_answer(qwen_model, tokenizer, probe):
    """One engine stream for whole and streamed answers: streams wait together and run as one batch (they ran one
    at a time before), each stream's pieces join to its own final text, whole answers in the same batch agree."""
    from valueprobe.server.engines.base import Finished, Piece, Prefilled

    prompts = _prompts(tokenizer, probe)
    metrics = SidecarMetrics(CollectorRegistry())

    async def main():
        engine = TransformersEngine(qwen_model, tokenizer, probe, max_batch_size=8, metrics=metrics)
        await engine.start()
        try:
            async def read(p, stream):
                events = [e async for e in engine.generate(p, probe, max_new_tokens=6, temperature=0, stream=stream)]
                return events

            alone = [await final_generation(engine.generate(p, probe, max_new_tokens=6, temperature=0)) for p in prompts]
            mixed = await asyncio.gather(*(read(p, i % 2 == 0) for i, p in enumerate(prompts)))
            return alone, mixed
        finally:
            await engine.stop()

    alone, mixed = asyncio.run(main())
    sizes = _batch_sizes(metrics)
    assert sizes["valueprobe_generation_batch_size_count"] - len(prompts) < len(prompts) / 2  # batched together
    for i, (a, events) in enumerate(zip(alone, mixed)):
        assert isinstance(events[0], Prefilled) and events[0].decision == "answer"
        assert isinstance(events[-1], Finished)
        gen = events[-1].generation
        assert (gen.text, gen.completion_tokens) == (a.text, a.completion_tokens)
        pieces = [e.text for e in events if isinstance(e, Piece)]
        if i % 2 == 0:
            assert "".join(pieces) == gen.text
        else:
            assert pieces == []  # a whole answer gets no pieces


def test_vllm_cpu_threads_are_bound_to_every_core_of_a_small_machine_unless_set():
    """vLLM's auto binding reserves a core for its scheduler: on 2 cores the model ran on one (half the speed)."""
    from valueprobe.server.engines.vllm_engine import SMALL_MACHINE_CORES, cpu_threads_bind

    env = {}
    assert cpu_threads_bind(env, [0, 1]) == "0,1"
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0,1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_threads_bind({}, list(range(SMALL_MACHINE_CORES + 1))) is None  # a large machine keeps vLLM's auto
    chosen = {"VLLM_CPU_OMP_THREADS_BIND": "auto"}
    assert cpu_threads_bind(chosen, [0, 1]) is None and chosen == {"VLLM_CPU_OMP_THREADS_BIND": "auto"}
