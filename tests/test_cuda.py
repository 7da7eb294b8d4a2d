"""The plugin and fitting on a CUDA device: readouts, extraction and step search give the CPU numbers. Skipped
without a GPU (CI has none); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.

Every hook keeps only ``[batch, k]`` per layer and moves it to the CPU, the vocabulary summary is computed on
the device, and the search keeps its KV caches there: these tests catch a tensor left on the wrong device or in
the wrong dtype, which CPU-only runs cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from conftest import MIXED_PROMPTS, build_model, synthetic_featureset  # noqa: E402

PROMPTS = MIXED_PROMPTS[:4]


@pytest.fixture(autouse=True)
def exact_matmuls():
    # TF32 would make the GPU numbers differ from the CPU's by ~1e-3 by design; the checks are about plumbing
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def fitted(tokenizer):
    from valueprobe.calibration.fit import FitConfig, fit_artifact
    from valueprobe.plugin import ValueProbe, save_artifact
    from valueprobe.plugin.prompting import PromptFormat

    model = build_model("qwen2", len(tokenizer))
    fs, _ = synthetic_featureset(model, tokenizer, n=120)
    data, _ = fit_artifact(model, tokenizer, fs, model_name="tiny-qwen2", prompt_format=PromptFormat(),
                           config=FitConfig(random_draws=5, progress=False))
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "probe.safetensors")
    save_artifact(data, path)
    return model, ValueProbe.load(path)


def test_probe_scores_on_cuda_equal_the_cpu_ones(fitted, tokenizer):
    model, probe = fitted
    on_cpu = probe.score(model, tokenizer, PROMPTS)
    gpu_model = build_model("qwen2", len(tokenizer)).cuda()
    on_gpu = probe.score(gpu_model, tokenizer, PROMPTS)
    assert probe.check_compatible(gpu_model, tokenizer) == []  # the fingerprint reads weights on the device
    for a, b in zip(on_cpu, on_gpu):
        assert b.probability == pytest.approx(a.probability, abs=1e-4)
        assert b.raw == pytest.approx(a.raw, abs=1e-4)
        assert b.components.keys() == a.components.keys()
        for name, value in a.components.items():
            assert b.components[name] == pytest.approx(value, abs=1e-4), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_read_in_float32(fitted, tokenizer, dtype):
    """Serving in half precision what was fitted in fp32: the readout runs (the head works in fp32 on the CPU) and
    stays near the fp32 one."""
    model, probe = fitted
    on_cpu = probe.score(model, tokenizer, PROMPTS)
    half = build_model("qwen2", len(tokenizer)).to("cuda", dtype)
    got = probe.score(half, tokenizer, PROMPTS)
    diffs = [abs(a.probability - b.probability) for a, b in zip(on_cpu, got)]
    assert all(np.isfinite(b.probability) and 0 <= b.probability <= 1 for b in got)
    assert max(diffs) < 0.05, diffs


def test_extraction_on_cuda_equals_the_cpu(tokenizer):
    from test_extract import QUESTIONS

    from valueprobe.calibration.extract import extract_features
    from valueprobe.plugin.prompting import PromptFormat

    fmt = PromptFormat(system="You are a careful assistant.")
    kwargs = dict(reuse_prefix=True, batch_size=3, generate_batch_size=3, max_new_tokens=4, progress=False)
    cpu = extract_features(build_model("qwen2", len(tokenizer)), tokenizer, QUESTIONS, fmt, **kwargs)
    gpu = extract_features(build_model("qwen2", len(tokenizer)).cuda(), tokenizer, QUESTIONS, fmt, **kwargs)
    assert gpu.features.device.type == "cpu"
    torch.testing.assert_close(gpu.features, cpu.features, rtol=1e-4, atol=1e-4)
    for a, b in zip(cpu.rows, gpu.rows):
        assert a["prediction"] == b["prediction"] and a["label"] == b["label"]
        assert b["max_softmax"] == pytest.approx(a["max_softmax"], abs=1e-4)


def test_step_search_on_cuda(tokenizer):
    """Batched value-beam keeps its caches on the device and reads each candidate's value as a prefill would;
    greedy answers equal the CPU's."""
    from test_search import LAYER, NEURON, planted_value, prompt_ids
    from test_trajectories import _newline_prone

    from valueprobe.plugin.hooks import capture
    from valueprobe.plugin.search import search_many

    cpu_model = _newline_prone(tokenizer)
    gpu_model = _newline_prone(tokenizer).cuda()
    prompts = [prompt_ids(tokenizer, t) for t in ("What is 2 plus 3?", "Hi", "Count the sheep in the field, please.")]
    many = search_many(gpu_model, tokenizer, prompts, layer=LAYER, neuron_indices=[NEURON], value=planted_value,
                       strategy="value-beam", width=3, max_steps=3, step_tokens=10, seed=1)
    for p, res in zip(prompts, many):
        assert res.rounds
        for round_ in res.rounds:
            for ids, step in round_:
                with torch.no_grad(), capture(cpu_model, [LAYER], [NEURON]) as cap:
                    cpu_model(input_ids=torch.tensor([p + ids]))
                assert step.value == pytest.approx(float(cap.batches[0][LAYER][0, 0]), abs=1e-4)
    kwargs = dict(layer=LAYER, neuron_indices=[NEURON], value=None, strategy="greedy", answer_tokens=12)
    for a, b in zip(search_many(cpu_model, tokenizer, prompts, **kwargs),
                    search_many(gpu_model, tokenizer, prompts, **kwargs)):
        assert a.text == b.text and a.tokens_generated == b.tokens_generated


def test_trace_states_recorded_on_cuda_equal_a_cpu_prefill(tokenizer, tmp_path):
    from test_trajectories import _newline_prone

    from valueprobe.calibration.data import Question
    from valueprobe.calibration.trajectories import generate_traces, load_traces, trace_states

    problems = [Question(f"p-{i}", f"What is {i} plus {i + 1}?", str(2 * i + 1), None, "numeric", "toy")
                for i in range(3)]
    out, states_dir = tmp_path / "traces.jsonl", tmp_path / "states"
    traces = generate_traces(_newline_prone(tokenizer).cuda(), tokenizer, problems, out, model_name="tiny",
                             n_samples=2, max_new_tokens=24, rows_per_batch=4, layers=[1, 2], states_dir=states_dir,
                             progress=False)
    assert len(traces) == 6 and sum(len(t["steps"]) for t in traces) >= 6
    recorded = trace_states(None, tokenizer, traces, states_dir=states_dir, progress=False)
    by_prefill = trace_states(_newline_prone(tokenizer), tokenizer, load_traces(out), layers=[1, 2],
                              problems={p.id: p for p in problems}, progress=False)
    for a, b in zip(recorded.states, by_prefill.states):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)  # stored as float16


def test_sidecar_engine_on_cuda_equals_the_cpu_engine(fitted, tokenizer):
    """The transformers engine of the sidecar on a CUDA model: batched scoring, greedy generation (confidence read
    during its prefill) and a batched value-beam search give what the CPU engine gives."""
    import asyncio
    from types import SimpleNamespace

    from valueprobe.plugin.nexttoken import prompt_kind
    from valueprobe.server.engines.base import Prompt, final_generation
    from valueprobe.server.engines.transformers_engine import TransformersEngine

    model, probe = fitted
    prompts = [Prompt(tuple(probe.encode(tokenizer, [p])["input_ids"][0].tolist()), prompt_kind(p)) for p in PROMPTS]
    spec = SimpleNamespace(strategy="value-beam", width=2, beam=1, max_steps=2, step_tokens=6)

    async def run(m):
        engine = TransformersEngine(m, tokenizer, probe)
        await engine.start()
        try:
            scores = await engine.score(prompts, probe)
            generated = await final_generation(engine.generate(prompts[0], probe, max_new_tokens=8, temperature=0))
            searched = await asyncio.gather(*(engine.search(p, probe, spec, temperature=0.8) for p in prompts[:2]))
            return scores, generated, searched
        finally:
            await engine.stop()

    cpu = asyncio.run(run(model))
    gpu = asyncio.run(run(build_model("qwen2", len(tokenizer)).cuda()))
    for a, b in zip(cpu[0], gpu[0]):
        assert b.probability == pytest.approx(a.probability, abs=1e-4)
    assert gpu[1].text == cpu[1].text and gpu[1].completion_tokens == cpu[1].completion_tokens
    assert gpu[1].confidence.probability == pytest.approx(cpu[1].confidence.probability, abs=1e-4)
    for res in gpu[2]:
        assert res.rounds and all(np.isfinite(s.value) for s in res.steps)


def test_bench_perf_times_a_cuda_model(fitted, tokenizer):
    from valueprobe.bench.perf import run

    model, probe = fitted
    rows = run(build_model("qwen2", len(tokenizer)).cuda(), tokenizer, probe, reps=1, new_tokens=2,
               progress=lambda r: None)
    assert [r[0] for r in rows][:2] == ["generate, 4 prompts x 2 tokens: probe attached / bare",
                                        "prompt-only score / bare full prefill (4 prompts)"]


def test_a_prompt_that_overflows_on_a_float16_gpu_fails_alone(fitted, tokenizer):
    """On a float16 CUDA model, a prompt whose states are NaN (planted, as an overflow leaves them) fails with a named
    probe error in batched scoring, batched sampled generation and a batched search; the others are answered."""
    import asyncio
    from types import SimpleNamespace

    from conftest import poisoned

    from valueprobe.plugin.nexttoken import prompt_kind
    from valueprobe.server.engines.base import Prompt, final_generation
    from valueprobe.server.engines.transformers_engine import TransformersEngine
    from valueprobe.server.errors import ProbeFailedError

    _, probe = fitted
    texts = [*PROMPTS[:3], "zebra zebra?"]
    prompts = [Prompt(tuple(probe.encode(tokenizer, [p])["input_ids"][0].tolist()), prompt_kind(p)) for p in texts]
    spec = SimpleNamespace(strategy="value-beam", width=2, beam=1, max_steps=2, step_tokens=4)
    model = build_model("qwen2", len(tokenizer)).cuda().half()

    async def run():
        engine = TransformersEngine(model, tokenizer, probe, max_wait_ms=50)
        await engine.start()
        try:
            scored = await asyncio.gather(*(engine.score([p], probe) for p in prompts), return_exceptions=True)
            generated = await asyncio.gather(*(final_generation(engine.generate(p, probe, max_new_tokens=4,
                                                                                temperature=0.9))
                                               for p in prompts), return_exceptions=True)
            searched = await asyncio.gather(*(engine.search(p, probe, spec, temperature=0.8) for p in prompts),
                                            return_exceptions=True)
            return scored, generated, searched
        finally:
            await engine.stop()

    with poisoned(model, tokenizer):
        for results in asyncio.run(run()):
            *ok, failed = results
            assert isinstance(failed, ProbeFailedError) and "not finite" in str(failed)
            assert not any(isinstance(r, Exception) for r in ok), ok
