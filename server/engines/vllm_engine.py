"""The sidecar's vLLM engine: vLLM's async engine in-process (continuous batching, paged KV cache, prefix caching,
chunked prefill), with the probe read inside vLLM's own forward pass by the worker extension of
:mod:`valueprobe.plugin.vllm`.

It implements :class:`~valueprobe.server.engines.base.EngineClient`, as the transformers engine does, so routes
and policy do not know which engine runs.

* Scoring a prompt is a request with ``max_tokens=1``: vLLM batches concurrent ones with whatever else runs, and
  the hook keeps the ``k`` values of the prompt's last token.
* Generation: the first output arrives right after the prefill step, when the readout is ready in the worker. The
  engine fetches it (one ``collective_rpc`` serves every request waiting at that moment), runs the policy, and
  aborts the request in vLLM when the policy will not answer, so at most one token is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid

import torch
from collections import Counter
from collections.abc import Iterable
from types import SimpleNamespace

from valueprobe.plugin import ProbeResult, ValueProbe
from valueprobe.plugin.models import eos_token_ids
from valueprobe.plugin.vllm import WORKER_EXTENSION, VllmProbe, attach_args, internal_request_id

from ..errors import ClientError, ProbeFailedError
from .base import (Admission, Finished, Generation, Piece, Prefilled, Prompt, TokenizerAccess, TokenLogprob,
                   not_finite_error)

__all__ = ["VllmEngine", "engine_args"]

# A request asks for its readout right after its prefill; one unclaimed this long belongs to a request that ended.
READOUT_TTL_S = 300.0
ANSWER_KEY = ":answer_end"  # the worker key of an answer-level artifact: its artifact id + this

logger = logging.getLogger("valueprobe.server")


def engine_args(model_dir: str, *, dtype: str = "float32", max_model_len: int | None = None,
                max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None, **extra):
    """``AsyncEngineArgs`` valueprobe needs: eager mode (hooks do not run in compiled graphs), the worker
    extension, prefix caching and chunked prefill on."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = dict(model=model_dir, dtype=dtype, enforce_eager=True, worker_extension_cls=WORKER_EXTENSION,
                  enable_prefix_caching=True, enable_chunked_prefill=True, max_model_len=max_model_len,
                  max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, **extra)
    return AsyncEngineArgs(**{k: v for k, v in kwargs.items() if v is not None})


#: machines with at most this many usable cores give vLLM's CPU worker all of them (see :func:`cpu_threads_bind`)
SMALL_MACHINE_CORES = 8


def cpu_threads_bind(environ, cores: list[int] | None = None) -> str | None:
    """Set vLLM's CPU thread binding for the machine it runs on, unless ``VLLM_CPU_OMP_THREADS_BIND`` is set.

    vLLM's ``auto`` binding reserves one core per rank for its scheduler: on 2 cores the model then runs on one
    (``core ids=[0]``, ``reserved_cpus=[1]`` in its log), and 16 concurrent chats took 30-35 s where binding both
    cores took 16-20 s (measured on this project's 2-core machine, see README). On a machine with at most
    :data:`SMALL_MACHINE_CORES` usable cores the worker gets them all (no core reserved); larger machines keep
    vLLM's own ``auto``. Returns the binding set (``None`` when left to the environment or to vLLM)."""
    import os

    if "VLLM_CPU_OMP_THREADS_BIND" in environ:
        return None
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) > SMALL_MACHINE_CORES:
        return None
    binding = ",".join(str(c) for c in cores)
    environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return binding


def _generation_config(model_dir: str):
    """The folder's ``generation_config.json``, or ``None`` where it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return None


class VllmEngine(TokenizerAccess):
    """vLLM's async engine in this process; implements :class:`~valueprobe.server.engines.base.EngineClient`
    (no step search: ``supports_search`` is false)."""

    supports_search = False
    # the worker extension reads the prefill only; reading each request's last decode step is not built yet
    supports_answer_confidence = True
    # answers generated elsewhere would need the prompt's whole next-token distribution from a prefill of prompt +
    # answer, which vLLM's prompt log-probabilities do not give: the transformers engine scores those
    supports_answer_scoring = False
    supports_logprobs = True  # vLLM's own (whole responses)

    def __init__(self, llm, tokenizer, probe: ValueProbe, *, max_queue: int = 64, metrics=None,
                 stop_token_ids: Iterable[int] = ()):
        super().__init__(tokenizer)
        self.llm, self.probe = llm, probe
        # Every token that ends an answer (tokenizer eos, generation config eos, the chat's end-of-turn token),
        # passed with each request: the same stops as the transformers engine, whatever eos_token says.
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_queue, self.metrics = max_queue, metrics
        self._attached: dict[str, VllmProbe] = {}
        self._users: Counter[str] = Counter()  # requests in flight per artifact id (and answer-level hook key)
        self._answer_hooks: set[str] = set()  # answer-level hooks in the worker
        self.answer_key: str | None = None  # the served answer-level artifact's hook (the latest attached)
        self._attach_lock = asyncio.Lock()  # attach and detach RPCs one at a time
        self._ready: dict[str, dict[str, list[float]]] = {}  # vLLM request id -> {artifact id: readout}
        self._ready_at: dict[str, float] = {}  # when each entry arrived (entries nobody asks for expire)
        # answer-level readouts: request id (the caller's, or vLLM's internal one when another request fetched them)
        # -> (fetch number, {answer key: the k values at the last token fed so far}); the latest fetch wins
        self._answers: dict[str, tuple[int, dict[str, list[float]]]] = {}
        self._fetches = itertools.count()
        self._fetch_lock = asyncio.Lock()
        self.admission = Admission(max_queue, "requests")
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

    @classmethod
    async def create(cls, model_dir: str, probe: ValueProbe, *, check_fingerprint: bool = True, max_queue: int = 64,
                     metrics=None, kv_cache_gb: float = 2.0, **kwargs) -> VllmEngine:
        import os

        from vllm.v1.engine.async_llm import AsyncLLM

        # On CPU vLLM otherwise reserves a fixed share of *all* memory and refuses to start when less is free.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gb:g}")
        cpu_threads_bind(os.environ)
        from transformers import AutoTokenizer

        # Prompts reach vLLM as token ids from the Hugging Face tokenizer the artifact was fitted with (vLLM's own
        # loader may pre-tokenize differently, e.g. its Mistral-regex fix); vLLM's tokenizer only detokenizes.
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, model_dir)
        stops = eos_token_ids(SimpleNamespace(generation_config=_generation_config(model_dir)), tokenizer)
        llm = AsyncLLM.from_engine_args(engine_args(model_dir, **kwargs))
        engine = cls(llm, tokenizer, probe, max_queue=max_queue, metrics=metrics, stop_token_ids=stops)
        try:
            await engine.attach(probe, strict=check_fingerprint)
        except Exception:
            llm.shutdown()
            raise
        return engine

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self):
        return None

    async def stop(self):
        self.llm.shutdown()

    # -- probe binding -------------------------------------------------------------------------------------------
    async def fingerprint(self, layer: int) -> dict[str, str]:
        return (await self.llm.collective_rpc("valueprobe_fingerprint", args=(layer,)))[0]

    async def check_compatible(self, probe: ValueProbe, strict: bool = True) -> list[str]:
        return VllmProbe.check_compatible(probe, await self.fingerprint(probe.layer), self.tokenizer, strict=strict)

    async def attach(self, probe: ValueProbe, strict: bool = True) -> None:
        """Check the fingerprint and hook ``probe`` in the worker. Several artifacts can be attached at once: after
        a reload, requests in flight finish with the artifact they started with, and the old one is detached when
        the last of them ends (:meth:`release_unused`)."""
        await self.check_compatible(probe, strict)
        await self._hook(probe)

    async def _hook(self, probe: ValueProbe) -> None:
        key = probe.artifact_id
        async with self._attach_lock:
            if key in self._attached:
                return
            letters = self.letter_ids(probe)
            await self.llm.collective_rpc("valueprobe_attach", args=attach_args(probe, letters, key=key))
            self._attached[key] = VllmProbe(probe, self.llm, letters)

    async def detach(self, probe: ValueProbe) -> None:
        """Remove ``probe``'s hooks from the worker."""
        async with self._attach_lock:
            await self._unhook(probe.artifact_id)

    async def _unhook(self, key: str) -> None:
        # under _attach_lock; forgotten first: a request arriving meanwhile re-hooks it (after this RPC) instead of
        # trusting a hook that is on its way out
        self._attached.pop(key, None)
        await self.llm.collective_rpc("valueprobe_detach", args=(key,))

    async def release_unused(self) -> list[str]:
        """Detach every artifact other than the served one that no request in flight uses (each hooked artifact
        costs a gather on every prefill). Returns the ids detached. Decided under the attach lock, so two requests
        ending together detach once, and an artifact a request has just started to use is kept."""
        async with self._attach_lock:
            gone = [key for key in self._attached if key != self.probe.artifact_id and not self._users[key]]
            for key in gone:
                await self._unhook(key)
            # answer-level hooks replaced by a promotion or a reload go the same way once no request reads them
            old_answers = [key for key in self._answer_hooks if key != self.answer_key and not self._users[key]]
            for key in old_answers:
                self._answer_hooks.discard(key)
                await self.llm.collective_rpc("valueprobe_detach", args=(key,))
        return gone + old_answers

    @property
    def attached(self) -> list[str]:
        """Artifact ids hooked in the worker now."""
        return sorted(self._attached)

    @contextlib.asynccontextmanager
    async def _using(self, probe: ValueProbe):
        """Hold ``probe`` hooked while a request runs. A request that took its snapshot just before a reload may
        arrive after its artifact was released: it is hooked again (it was checked when first attached)."""
        key = probe.artifact_id
        self._users[key] += 1
        try:
            if key not in self._attached:
                await self._hook(probe)
            yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                if key != self.probe.artifact_id:
                    await self.release_unused()

    @property
    def context_length(self) -> int | None:
        return getattr(self.llm.model_config, "max_model_len", None)

    # -- readouts ------------------------------------------------------------------------------------------------
    async def _confidence(self, request_id: str, prompt: Prompt, probe: ValueProbe) -> ProbeResult:
        """The readout of ``request_id``'s prefill: fetched from the worker (one RPC for every request waiting),
        then turned into a :class:`ProbeResult` here."""
        key = probe.artifact_id
        for _ in range(50):
            async with self._fetch_lock:
                found = self._pop(request_id, key)
                if found is None:
                    self._store((await self.llm.collective_rpc("valueprobe_take", args=(None,)))[0])
                    found = self._pop(request_id, key)
            if found is not None:
                try:
                    result = self._attached[key].results({request_id: found}, {request_id: prompt.kind})[request_id]
                except Exception as exc:  # noqa: BLE001 - a readout failure is the probe's, named as such
                    raise ProbeFailedError(f"probe readout failed: {type(exc).__name__}: {exc}") from exc
                failure = not_finite_error(result, probe)
                if failure is not None:
                    raise failure
                return result
            await asyncio.sleep(0.01)
        raise ProbeFailedError("the probe hook did not fire during the prefill")

    def _store(self, fetched: dict, now: float | None = None) -> None:
        """Keep fetched readouts until their requests ask; drop those nobody asked for in ``READOUT_TTL_S``
        (a request aborted or cancelled before its first output never asks). Answer-level values (keys ending in
        ``ANSWER_KEY``) are kept apart, the latest fetch winning: the worker overwrites them at every step."""
        import time

        now = time.monotonic() if now is None else now
        fetch = next(self._fetches)
        for rid, entry in fetched.items():
            answer = {k: v for k, v in entry.items() if k.endswith(ANSWER_KEY)}
            if answer:
                self._answers[rid] = (fetch, {**self._answers.get(rid, (0, {}))[1], **answer})
            prompt = {k: v for k, v in entry.items() if not k.endswith(ANSWER_KEY)}
            if prompt:
                self._ready.setdefault(rid, {}).update(prompt)
            self._ready_at[rid] = now
        for rid in [r for r, t in self._ready_at.items() if now - t > READOUT_TTL_S]:
            self._ready.pop(rid, None)
            self._answers.pop(rid, None)
            self._ready_at.pop(rid, None)

    def _pop(self, request_id: str, key: str):
        """This request's readout by ``key``; the whole entry goes, so readouts by other attached artifacts (during
        a reload both read every prefill) do not pile up."""
        internal = internal_request_id(request_id, self._ready)
        if internal is None or key not in self._ready[internal]:
            return None
        self._ready_at.pop(internal, None)
        return self._ready.pop(internal)[key]

    async def attach_answer(self, answer_probe: ValueProbe, strict: bool = True) -> None:
        """Check ``answer_probe`` (an answer_end artifact) against the worker's model and hook it: the worker keeps
        every request's latest ``k`` values at that layer, read when the request finishes."""
        await self.check_compatible(answer_probe, strict)
        key = answer_probe.artifact_id + ANSWER_KEY
        async with self._attach_lock:
            if key not in self._answer_hooks:
                await self.llm.collective_rpc("valueprobe_attach", args=attach_args(
                    answer_probe, None, key=key,
                    position="answer_mean" if answer_probe.answer_read == "mean" else "answer_end"))
                self._answer_hooks.add(key)
            self.answer_key = key  # the newest attached is the one served (release_unused detaches the others)

    async def _answer_readout(self, request_id: str, prompt: Prompt, answer_probe: ValueProbe, confidence: ProbeResult,
                              token_logprobs: list[float], read_at: str) -> ProbeResult | None:
        """The answer-level readout of a finished request: the worker's latest values for it (the state at the last
        token it was fed), the answer's token log-probabilities and the prompt's next-token signal (the prompt-level
        readout's components). ``None`` (logged) when a part is missing."""
        key = answer_probe.artifact_id + ANSWER_KEY
        async with self._fetch_lock:
            self._store((await self.llm.collective_rpc("valueprobe_take", args=([request_id],)))[0])
            # stored under the caller's id, or vLLM's internal one when another request's fetch took it: the latest
            matches = [rid for rid in self._answers if rid == request_id or rid.startswith(f"{request_id}-")]
            latest = max(matches, key=lambda rid: self._answers[rid][0], default=None)
            values = None if latest is None else self._answers[latest][1].get(key)
            for rid in matches:
                del self._answers[rid]
        comps = confidence.components or {}
        if values is None or "max_softmax" not in comps:
            logger.warning("no answer-level readout for %s (%s)", request_id,
                           "no values from the worker" if values is None else "the prompt artifact reads no next-token signal")
            return None
        try:
            return answer_probe.readout_answer(torch.tensor([values], dtype=torch.float32), [token_logprobs], None,
                                               [prompt.kind], prompt_signals=([comps["max_softmax"]], [comps["entropy"]]),
                                               read_at=[read_at])[0]
        except Exception:  # noqa: BLE001 - the answer's confidence fails alone; the answer stands without it
            logger.exception("answer-level readout failed (artifact %s)", answer_probe.artifact_id)
            return None

    async def search(self, prompt: Prompt, probe: ValueProbe, spec, *, temperature=None, seed=None, on_step=None):
        raise ClientError("search is served by the transformers engine, not by vLLM")

    def _params(self, max_new_tokens: int, temperature=None, top_p=None, seed=None, stop=None, logprobs=None):
        from vllm import SamplingParams

        # vLLM's log-probabilities are the model's raw distribution by default (not the sampler's), as in the
        # transformers engine; it returns the top ``logprobs`` tokens plus the sampled one
        stops = dict(stop=stop or None, stop_token_ids=self.stop_token_ids or None, logprobs=logprobs)
        if temperature and temperature > 0:
            return SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p or 1.0, seed=seed,
                                  **stops)
        return SamplingParams(max_tokens=max_new_tokens, temperature=0.0, **stops)

    def _next_id(self) -> str:
        return f"vp-{self._prefix}-{next(self._ids)}"

    async def _prefill_only(self, prompt: Prompt, probe: ValueProbe) -> ProbeResult:
        rid = self._next_id()
        async for _ in self.llm.generate({"prompt_token_ids": list(prompt.input_ids)}, self._params(1), rid):
            pass
        return await self._confidence(rid, prompt, probe)

    async def score(self, prompts: list[Prompt], probe: ValueProbe) -> list[ProbeResult]:
        """Score prompts: one vLLM request each (``max_tokens=1``), run concurrently; vLLM batches them."""
        with self.admission.slot():
            if self.metrics:
                self.metrics.batch_size.observe(len(prompts))
            async with self._using(probe):
                return list(await asyncio.gather(*(self._prefill_only(p, probe) for p in prompts)))

    async def _events(self, prompt: Prompt, probe: ValueProbe, params, policy, stream: bool,
                      answer_probe: ValueProbe | None = None, asked_logprobs: int | None = None):
        """:meth:`_request_events`, holding the answer-level hook it reads until the request ends (a promotion or
        reload meanwhile detaches the old hook only after its last reader)."""
        key = None if answer_probe is None else answer_probe.artifact_id + ANSWER_KEY
        if key is not None:
            self._users[key] += 1
        try:
            async for event in self._request_events(prompt, probe, params, policy, stream, answer_probe,
                                                    asked_logprobs):
                yield event
        finally:
            if key is not None:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]
                    if key != self.answer_key:
                        await self.release_unused()

    async def _request_events(self, prompt: Prompt, probe: ValueProbe, params, policy, stream: bool,
                              answer_probe: ValueProbe | None = None, asked_logprobs: int | None = None):
        """Drive one request as an engine stream: the policy decides on the first output (right after the prefill)
        and a request it does not answer is aborted there. With ``answer_probe`` the finished answer gets its
        answer-level readout (``params`` then ask vLLM for the sampled tokens' log-probabilities). Closing the
        stream aborts the request."""
        rid = self._next_id()
        confidence = None
        text, n_tokens, finish = "", 0, "length"
        running = True
        completion = None
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(prompt.input_ids)}, params, rid):
                completion = out.outputs[0]
                if confidence is None:  # no answer without its confidence: a failure here aborts the request
                    confidence = await self._confidence(rid, prompt, probe)
                    decision = "answer" if policy is None else policy.decide(confidence.probability)
                    yield Prefilled(confidence, decision)
                    if decision != "answer":
                        finish = "aborted"
                        break
                piece = completion.text[len(text):]
                text, n_tokens = completion.text, len(completion.token_ids)
                if piece and stream:
                    yield Piece(piece)
                if out.finished:
                    finish = completion.finish_reason or "stop"
                    running = False
        finally:
            if running:  # stopped early: not answered here, failed, or the stream was closed
                await self.llm.abort(rid)
        if confidence is None:
            raise ProbeFailedError("the request produced no output")
        records = None
        if params.logprobs is not None and finish != "aborted":
            records = self._token_logprobs(completion, params.logprobs)
        answer = None
        if answer_probe is not None and records is not None:
            # vLLM never feeds back the token it samples last: an answer stopped at the token limit is read at the
            # state before its last token (the transformers engine runs that one more step), and says so
            answer = await self._answer_readout(rid, prompt, answer_probe, confidence, [t.logprob for t in records],
                                                "last_token" if finish != "length" else "before_last_token")
        yield Finished(Generation(text, len(prompt.input_ids), n_tokens,
                                  finish if finish in ("stop", "length", "aborted") else "stop", confidence, answer=answer,
                                  token_logprobs=None if records is None else [t.logprob for t in records],
                                  token_ids=None if records is None else [t.id for t in records],
                                  logprobs=records if asked_logprobs is not None else None))

    def _token_logprobs(self, completion, top: int) -> list[TokenLogprob]:
        """Each returned token with its log-probability and its ``top`` alternatives (by rank), from vLLM's
        per-step ``{token id: Logprob}``; an end-of-answer token vLLM keeps at the end is not part of the text."""
        ids = list(completion.token_ids)
        steps = list(completion.logprobs or [])
        while ids and ids[-1] in set(self.stop_token_ids or ()):
            ids.pop()
        records = []
        for token, step in zip(ids, steps):
            chosen = step[token]
            ranked = sorted(((lp.rank, tid, lp) for tid, lp in step.items() if lp.rank is not None and lp.rank <= top),
                            key=lambda x: x[0])[:top]
            records.append(TokenLogprob(int(token), chosen.decoded_token if chosen.decoded_token is not None
                                        else self.decode([token]), float(chosen.logprob),
                                        tuple((int(tid), lp.decoded_token if lp.decoded_token is not None
                                               else self.decode([tid]), float(lp.logprob)) for _, tid, lp in ranked)))
        return records

    async def generate(self, prompt: Prompt, probe: ValueProbe, *, max_new_tokens: int, temperature=None, top_p=None,
                       seed=None, stop=None, policy=None, answer_probe=None, logprobs=None, stream: bool = False):
        """The engine stream of one request (see :class:`~valueprobe.server.engines.base.EngineClient`); vLLM
        batches the requests in flight, streamed or not."""
        with self.admission.slot():
            async with self._using(probe):
                wanted = logprobs if logprobs is not None else (0 if answer_probe is not None else None)
                events = self._events(prompt, probe, self._params(max_new_tokens, temperature, top_p, seed, stop,
                                                                  wanted), policy, stream, answer_probe=answer_probe,
                                      asked_logprobs=logprobs)
                try:
                    async for event in events:
                        yield event
                finally:
                    await events.aclose()

    async def score_answers(self, prompts, answers, answer_probe):
        """Not served by this engine (``supports_answer_scoring`` is false: the sidecar refuses first)."""
        raise ProbeFailedError("the vLLM engine does not score given answers yet; use the transformers engine")
