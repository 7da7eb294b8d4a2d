"""The model side of the sidecar (no FastAPI here): dynamic batching of prompt-only scoring, and embedded
generation with the probe's hook reading the prefill of the same forward pass.

Threads: scoring batches run on one worker thread and generations on another, so a long generation does not
hold up prompt-only scoring. Generations that wait for the generation thread run together as one batched
``generate`` when they can share it (greedy ones; sampled ones with the same temperature and top-p and no seed),
as searches do, streamed or not. The probe hooks are registered per call with
``thread_only=True``: each thread's forward passes are read only by its own hooks. Every call carries the probe it must use (the request's
snapshot), so a hot reload never mixes two artifacts inside one request.

Tokenizer: a Hugging Face fast tokenizer must not be used from two threads at once ("Already borrowed"). Every
encode goes through :meth:`TransformersEngine.tokenize` under a lock, prompts are tokenized once per request (on the event
loop, for the context check) and the model threads receive token ids, which they pad themselves: the user's
tokenizer is never mutated (no pad token or padding side is set on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from valueprobe.plugin import ProbeHandle, ProbeResult, ValueProbe
from valueprobe.plugin.hooks import StepStateRecorder
from valueprobe.plugin.probe import answer_end_column
from valueprobe.plugin.readout import pool_answer
from valueprobe.plugin.models import eos_token_ids
from valueprobe.plugin.nexttoken import summarize_logits
from valueprobe.plugin.prompting import pad_left, pad_token_id

from ..errors import OverloadedError, ProbeFailedError
from .base import (Admission, Finished, Generation, Piece, Prefilled, Prompt, StopFlag, TokenizerAccess, TokenLogprob,
                   not_finite_error)

__all__ = ["TransformersEngine"]

logger = logging.getLogger("valueprobe.server")


def _not_a_number(value: float | None) -> bool:
    """A step value that is inf or NaN (``None``, a step no value read, is not one)."""
    return value is not None and not math.isfinite(value)


class _RowStops:
    """Stopping criterion for a batched ``generate``: row ``i`` ends when its stop flag is set or it has made its
    own ``limits[i]`` tokens; ``ended_at[i]`` records how many it had made then (later positions are padding)."""

    def __init__(self, flags: list[StopFlag], limits: list[int], prompt_length: int):
        self.flags, self.limits, self.prompt_length = flags, limits, prompt_length
        self.ended_at: list[int | None] = [None] * len(flags)

    def __call__(self, input_ids, scores, **kwargs):
        made = input_ids.shape[1] - self.prompt_length
        for i, (flag, limit) in enumerate(zip(self.flags, self.limits)):
            if self.ended_at[i] is None and (flag.event.is_set() or made >= limit):
                self.ended_at[i] = made
        return torch.tensor([e is not None for e in self.ended_at], dtype=torch.bool, device=input_ids.device)


@dataclass(eq=False)  # a job is itself, not its fields
class _GenerateJob:
    prompt: Prompt
    probe: ValueProbe
    max_new_tokens: int
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: list[str]
    policy: object | None = None  # its decide(p) is taken at the prefill; a row it does not answer stops there
    stop_flag: StopFlag = field(default_factory=StopFlag)
    future: asyncio.Future | None = None
    answer_probe: ValueProbe | None = None  # an answer_end artifact: confidence in the answer given
    logprobs: int | None = None  # None: not asked; n >= 0: each token's log-probability and its n top alternatives
    stream: bool = False  # Piece events as the tokens come
    events: asyncio.Queue | None = None  # Prefilled and Piece events, put from the generation thread
    loop: asyncio.AbstractEventLoop | None = None

    def emit(self, event) -> None:
        """Hand an event to the request's stream (called on the generation thread; a job run directly, with no
        stream, as `bench answer` runs one, keeps none)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @property
    def sampled(self) -> bool:
        return bool(self.temperature and self.temperature > 0)

    @property
    def key(self) -> tuple:
        probes = (id(self.probe), id(self.answer_probe))
        if not self.sampled:  # greedy: the seed means nothing
            return (*probes, "greedy")
        if self.seed is not None:  # a seeded sample runs alone, so its seed means the same thing every time
            return (id(self),)
        return (*probes, "sample", self.temperature, self.top_p or 1.0)


@dataclass(eq=False)
class _SearchJob:
    prompt: Prompt
    probe: ValueProbe
    spec: object
    temperature: float
    seed: int | None
    on_step: Callable
    future: asyncio.Future

    @property
    def key(self) -> tuple:
        s = self.spec
        alone = id(self) if self.seed is not None else None
        return (self.probe.artifact_id, s.strategy, s.width, s.beam, s.max_steps, s.step_tokens, self.temperature,
                alone)


class TransformersEngine(TokenizerAccess):
    """Hugging Face ``generate`` in this process (see the module docstring); implements
    :class:`~valueprobe.server.engines.base.EngineClient`."""

    supports_search = True
    supports_answer_confidence = True
    supports_answer_scoring = True
    supports_logprobs = True

    def __init__(self, model, tokenizer, probe: ValueProbe, *, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 max_queue: int = 64, metrics=None):
        super().__init__(tokenizer)
        self.model, self.probe = model, probe
        self.max_batch_size, self.max_wait_s, self.metrics = max_batch_size, max_wait_ms / 1000, metrics
        self.max_queue = max_queue
        # One queue entry per *request* (a list of prompts counts once): a list longer than the queue can be admitted.
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.score_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="valueprobe-score")
        self.generate_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="valueprobe-generate")
        self.device = next(model.parameters()).device
        self.pad_id = pad_token_id(tokenizer)
        # every token that ends an answer, read here once (the chat template's end-of-turn token is found by
        # encoding, which must not happen on the model thread beside an encode on the event loop)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.admission = Admission(max_queue, "generations")
        self._batcher: asyncio.Task | None = None
        # waiting for the generation thread: searches batched by probe and spec, generations by probe and sampling
        self._searches: list[_SearchJob] = []
        self._waiting_generations: list[_GenerateJob] = []
        self._search_drain: asyncio.Future | None = None
        self._generation_drain: asyncio.Future | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self):
        self._batcher = asyncio.create_task(self._batch_loop())

    async def stop(self):
        for task in (self._batcher, self._search_drain, self._generation_drain):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for executor in (self.score_executor, self.generate_executor):
            executor.shutdown(wait=False, cancel_futures=True)

    # -- probe binding -------------------------------------------------------------------------------------------
    async def check_compatible(self, probe: ValueProbe, strict: bool = True) -> list[str]:
        """The artifact's fingerprint against the served model and tokenizer (raises when ``strict``)."""
        return await asyncio.to_thread(probe.check_compatible, self.model, self.tokenizer, strict=strict)

    async def attach(self, probe: ValueProbe, strict: bool = True) -> None:
        """Make ``probe`` servable (hooks are registered per call here, so checking is all there is)."""
        await self.check_compatible(probe, strict)

    async def attach_answer(self, answer_probe: ValueProbe, strict: bool = True) -> None:
        """Make an answer-level artifact servable: its fingerprint against the served model (it is read by hooks
        registered per generation)."""
        await self.check_compatible(answer_probe, strict)

    async def release_unused(self) -> list[str]:
        """Nothing stays hooked between calls here, so nothing is released."""
        return []

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # -- prompt-only scoring, dynamically batched ----------------------------------------------------------------
    async def score(self, prompts: list[Prompt], probe: ValueProbe) -> list[ProbeResult]:
        """Score prompts with ``probe``; batched with concurrent callers. A list is admitted as one request (any
        length the route allows); :class:`OverloadedError` when ``max_queue`` requests are already waiting."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((list(prompts), probe, future))
        except asyncio.QueueFull:
            raise OverloadedError("scoring queue is full; retry shortly") from None
        if self.metrics:
            self.metrics.queue_depth.set(self.queue.qsize())
        return await future

    async def _batch_loop(self):
        loop = asyncio.get_running_loop()
        while True:
            entries = [await self.queue.get()]
            size = len(entries[0][0])
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    entry = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                entries.append(entry)
                size += len(entry[0])
            if self.metrics:
                self.metrics.queue_depth.set(self.queue.qsize())
            live = [e for e in entries if not e[2].done()]
            # Only prompts rendered for the same artifact share a forward pass.
            by_probe: dict[int, list] = {}
            for e in live:
                by_probe.setdefault(id(e[1]), []).append(e)
            for group in by_probe.values():
                await self._run_group(group)

    async def _run_group(self, group):
        probe = group[0][1]
        prompts = [p for prompts, _, _ in group for p in prompts]
        results: list[ProbeResult] = []
        try:
            for start in range(0, len(prompts), self.max_batch_size):
                chunk = prompts[start : start + self.max_batch_size]
                if self.metrics:
                    self.metrics.batch_size.observe(len(chunk))
                results.extend(await asyncio.get_running_loop().run_in_executor(
                    self.score_executor, self._score_batch, chunk, probe))
        except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
            for _, _, f in group:
                if not f.done():
                    f.set_exception(exc)
            return
        offset = 0
        for prompts_, _, f in group:
            mine = results[offset : offset + len(prompts_)]
            offset += len(prompts_)
            if f.done():
                continue
            failures = [(i, e) for i, e in enumerate(not_finite_error(r, probe) for r in mine) if e is not None]
            if failures:
                i, failure = failures[0]
                f.set_exception(failure if len(mine) == 1 else
                                ProbeFailedError(f"prompt {i} of the {len(mine)} in this request: {failure}"))
            else:
                f.set_result(mine)

    @torch.inference_mode()
    def _score_batch(self, prompts: list[Prompt], probe: ValueProbe) -> list[ProbeResult]:
        enc = pad_left([list(p.input_ids) for p in prompts], self.pad_id).to(self.device)
        letters = self.letter_ids(probe)
        started = time.perf_counter()
        values = probe.prefill(self.model, enc, letters, thread_only=True)
        t_readout = time.perf_counter()
        if values is None:
            raise ProbeFailedError("the probe hook did not fire during the prefill")
        try:
            results = probe.readout(values[probe.layer], values.get("next_token"), [p.kind for p in prompts])
        except Exception as exc:  # noqa: BLE001 - a readout failure is the probe's, named as such
            raise ProbeFailedError(f"probe readout failed: {type(exc).__name__}: {exc}") from exc
        if self.metrics:
            self.metrics.prefill_latency.observe(t_readout - started)
            self.metrics.probe_latency.observe(time.perf_counter() - t_readout)
        return results

    # -- confidence in answers generated elsewhere ------------------------------------------------------------------
    async def score_answers(self, prompts: list[Prompt], answers: list[tuple[int, ...]], answer_probe: ValueProbe
                            ) -> list[ProbeResult]:
        """Confidence in given answers: one prefill of each prompt + answer (on the scoring thread), the answer
        probe read at the last token, the answer's token log-probabilities from the same pass."""
        results: list[ProbeResult] = []
        loop = asyncio.get_running_loop()
        for start in range(0, len(prompts), self.max_batch_size):
            results.extend(await loop.run_in_executor(
                self.score_executor, self._score_answer_batch, prompts[start : start + self.max_batch_size],
                answers[start : start + self.max_batch_size], answer_probe))
        return results

    def _score_answer_batch(self, prompts, answers, answer_probe: ValueProbe) -> list[ProbeResult]:
        return answer_probe.read_answers(self.model, [p.input_ids for p in prompts], answers, [p.kind for p in prompts],
                                         letter_ids=self.letter_ids(answer_probe, always=True), pad_id=self.pad_id,
                                         thread_only=True)

    # -- embedded generation --------------------------------------------------------------------------------------
    def _gen_kwargs(self, max_new_tokens: int, temperature: float | None, top_p: float | None, seed: int | None):
        # stop where the answer ends whatever the model's generation config says (answers are cut there anyway)
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.pad_id,
                  "eos_token_id": sorted(self.eos_ids)}
        if temperature and temperature > 0:
            # a row whose state overflowed (failed by `not_finite_error`, stopped at prefill) must not crash the
            # batch's sampling with NaN probabilities before it stops
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p or 1.0, remove_invalid_values=True)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.inference_mode()
    def _generate_batch(self, jobs: list[_GenerateJob]) -> list[Generation | ProbeFailedError]:
        """Generate for ``jobs`` (which share a key) in one left-padded batch, with the probe reading the prefill.
        As soon as the prefill is scored, before the first decode step, each job's policy decides and the job's
        stream gets :class:`Prefilled`; a row the policy does not answer stops there, so no tokens are spent on
        an answer that will not be used. A row also stops at its own ``max_new_tokens``; the batch runs until every
        row has stopped. Jobs that stream get :class:`Piece` s as their tokens come (:class:`_RowStreamer`). A row
        whose readout is not finite stops at prefill and gets its :func:`not_finite_error` in place of a
        generation."""
        from transformers import StoppingCriteriaList

        first = jobs[0]
        probe = first.probe
        enc = pad_left([list(j.prompt.input_ids) for j in jobs], self.pad_id).to(self.device)
        prompt_length = enc["input_ids"].shape[1]
        seen: list[ProbeResult] = []
        failures: list[Exception] = []
        not_finite: dict[int, ProbeFailedError] = {}  # rows whose readout is not a number
        rows = _RowStops([j.stop_flag for j in jobs], [j.max_new_tokens for j in jobs], prompt_length)

        def on_score(results):
            seen.extend(results)
            for i, (j, result) in enumerate(zip(jobs, results)):
                failure = not_finite_error(result, probe)
                if failure is not None:  # answered with its failure below; its row stops now
                    not_finite[i] = failure
                    j.stop_flag.event.set()
                    continue
                decision = "answer" if j.policy is None else j.policy.decide(result.probability)
                if decision != "answer":
                    j.stop_flag.event.set()
                j.emit(Prefilled(result, decision))

        def on_error(exc):  # the readout failed: every row stops, the batch is answered with the failure
            failures.append(exc)
            for j in jobs:
                j.stop_flag.event.set()

        # the probe read through the same handle as plugin users' generate (thread_only: this thread's forwards)
        handle = ProbeHandle(probe, self.model, on_score, self.letter_ids(probe), thread_only=True, on_error=on_error)
        handle.kinds = [j.prompt.kind for j in jobs]
        answer_probe = first.answer_probe
        # The answer-end state is computed anyway: the decode step that feeds an answer's last token (and emits its
        # end) runs through the same layer; the recorder keeps that layer's k values of every forward's last column.
        recorder = (StepStateRecorder(self.model, [answer_probe.layer], neuron_indices=answer_probe.neuron_indices,
                                      dtype=torch.float32) if answer_probe is not None else contextlib.nullcontext())
        with handle, recorder:
            extra = {"stopping_criteria": StoppingCriteriaList([rows])}
            if any(j.stream for j in jobs):
                extra["streamer"] = _RowStreamer(self, jobs)
            want_logits = answer_probe is not None or any(j.logprobs is not None for j in jobs)
            if want_logits:  # the answer's token log-probabilities: the stack's free signal, and what clients ask
                extra.update(output_logits=True, return_dict_in_generate=True)
            kwargs = self._gen_kwargs(max(j.max_new_tokens for j in jobs), first.temperature, first.top_p, first.seed)
            out = self.model.generate(**enc, **kwargs, **extra)
        sequences = out.sequences if want_logits else out
        if failures:
            raise ProbeFailedError(f"probe readout failed: {type(failures[0]).__name__}: {failures[0]}")
        if len(seen) != len(jobs):
            raise ProbeFailedError("the probe hook did not fire during the prefill")
        eos = self.eos_ids
        generations: list[Generation | ProbeFailedError] = []
        pending_answers = []  # (row, kept tokens, their log-probabilities) read together below
        for i, job in enumerate(jobs):
            if i in not_finite:
                generations.append(not_finite[i])
                continue
            new = sequences[i, prompt_length:].tolist()[: rows.ended_at[i] if rows.ended_at[i] is not None else None]
            new = new[: job.max_new_tokens]
            stopped = next((k for k, t in enumerate(new) if t in eos), None)
            tokens = new if stopped is None else new[:stopped]
            generated = self.decode(tokens)
            finish = "stop" if stopped is not None else ("aborted" if job.stop_flag.event.is_set() else "length")
            kept = len(tokens)
            for s in job.stop or []:
                if s and s in generated:
                    generated, finish = generated.split(s, 1)[0], "stop"
                    kept = self._tokens_within(tokens, generated)
            scored = answer_probe is not None and finish != "aborted"
            # each kept token's log-probability, computed once: served when asked, and the answer readout's input
            records = (self._token_logprobs(out, i, tokens[:kept], job.logprobs or 0)
                       if job.logprobs is not None or scored else None)
            generations.append(Generation(
                generated, len(job.prompt.input_ids), len(tokens), finish, seen[i], token_ids=tokens[:kept],
                logprobs=records if job.logprobs is not None else None))
            if scored:
                pending_answers.append((i, kept, [t.logprob for t in records]))
        if pending_answers:
            columns = self._answer_columns(answer_probe, recorder, out, enc["attention_mask"], prompt_length,
                                           max(kept for _, kept, _ in pending_answers))
            self._read_answers(answer_probe, jobs, generations, pending_answers, columns, out)
        return generations

    def _token_logprobs(self, out, row: int, tokens: list[int], top: int) -> list[TokenLogprob]:
        """Each kept token of ``row`` with its log-probability from generate's raw logits (the model's
        distribution: what OpenAI's and TGI's log-probabilities are) and its ``top`` alternatives."""
        records = []
        for j, t in enumerate(tokens):
            lp = torch.log_softmax(out.logits[j][row].float(), dim=-1)
            alternatives = ()
            if top:
                values, ids = lp.topk(top)
                alternatives = tuple((int(a), self.decode([int(a)]), float(v)) for a, v in zip(ids, values))
            records.append(TokenLogprob(int(t), self.decode([int(t)]), float(lp[t]), alternatives))
        return records

    def _tokens_within(self, tokens: list[int], text: str) -> int:
        """How many of ``tokens`` decode inside ``text`` (an answer cut at a stop string): its last token is where
        the answer the client gets ends."""
        kept = 0
        while kept < len(tokens) and len(self.decode(tokens[: kept + 1])) <= len(text):
            kept += 1
        return kept

    def _answer_columns(self, answer_probe, recorder, out, prompt_mask, prompt_length, longest: int) -> torch.Tensor:
        """``[batch, forwards (+1), k]``: the answer probe's values at the last column of every forward generate
        ran (:func:`~valueprobe.plugin.probe.answer_end_column`), plus one decode step on generate's KV cache
        when the ``longest`` kept answer stopped at the token limit on the batch's last step, so that its last
        token was never fed back (only then; read by a recorder of its own)."""
        states = recorder.states()[answer_probe.layer]
        forwards = len(out.logits)  # the prefill plus one decode step per generated token but the last
        if answer_end_column(longest, forwards) is not None:
            return states
        made = out.sequences.shape[1] - prompt_length
        mask = torch.cat([prompt_mask, prompt_mask.new_ones((prompt_mask.shape[0], made))], dim=1)
        with StepStateRecorder(self.model, [answer_probe.layer], neuron_indices=answer_probe.neuron_indices,
                               dtype=torch.float32) as one_more:
            self.model(input_ids=out.sequences[:, -1:], attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                       past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        return torch.cat([states, one_more.states()[answer_probe.layer]], dim=1)

    def _read_answers(self, answer_probe, jobs, generations, pending, columns, out) -> None:
        """Each answered row's ``generation.answer``: the answer probe's readout at its answer's last token, with
        its tokens' log-probabilities (``pending``: ``(row, kept tokens, their log-probabilities)``)."""
        # column j is the state after generated token j - 1: the answer's tokens are columns 1..kept (an empty
        # answer has only the prompt's last token, column 0); the artifact reads the last or their mean
        values = [pool_answer(columns[i, 1 : kept + 1] if kept else columns[i, :1], answer_probe.answer_read)
                  for i, kept, _ in pending]
        logprobs = [lps for _, _, lps in pending]
        kinds = [jobs[i].prompt.kind for i, _, _ in pending]
        rows = [i for i, _, _ in pending]
        # the prompt's next-token distribution: generate's first logits, the prefill's last position
        first = summarize_logits(out.logits[0][rows], self.letter_ids(answer_probe, always=True))
        try:
            # read at each answer's last token: a row stopped at the token limit had one more step run for it
            results = answer_probe.readout_answer(torch.stack(values), logprobs, first, kinds,
                                                  read_at=["last_token"] * len(values))
        except Exception:  # noqa: BLE001 - the answer's confidence fails alone; the answer stands without it
            logger.exception("answer-level readout failed (artifact %s)", answer_probe.artifact_id)
            results = [None] * len(pending)
        for (i, _, _), result, lp in zip(pending, results, logprobs):
            generations[i] = replace(generations[i], answer=result, token_logprobs=lp)

    def _search_group(self, jobs: list[_SearchJob]):
        """One batched search (:func:`valueprobe.plugin.search.search_many`) for jobs that share probe and spec."""
        from valueprobe.plugin.search import final_answer, newline_token_ids, search_many

        with self._tokenizer_lock:  # vocabulary scan, once per tokenizer, never beside a running encode
            newline_token_ids(self.tokenizer)
        first = jobs[0]
        spec, probe = first.spec, first.probe
        results = search_many(self.model, self.tokenizer, [j.prompt.input_ids for j in jobs], layer=probe.layer,
                              neuron_indices=probe.neuron_indices, value=probe.predict_proba, strategy=spec.strategy,
                              width=spec.width, beam=spec.beam, max_steps=spec.max_steps, step_tokens=spec.step_tokens,
                              answer_tokens=spec.max_steps * spec.step_tokens, temperature=first.temperature,
                              seed=first.seed or 0, extract=final_answer,
                              on_step=lambda i, step: jobs[i].on_step(step), decode=self.decode)
        # a search whose states overflowed fails alone (its values would not be numbers)
        return [ProbeFailedError(f"a step value of artifact {probe.artifact_id} (layer {probe.layer}) is not finite "
                                 "(inf or NaN: a float16 overflow, say); no search answer is given")
                if any(_not_a_number(st.value) for st in r.steps) else r
                for r in results]

    async def search(self, prompt: Prompt, probe: ValueProbe, spec, *, temperature=None, seed=None, on_step=None):
        """Value-guided step search with ``probe``'s value, on the generation thread; ``on_step(step)`` runs on the
        event loop for each kept step. Searches that arrive while one runs, with the same probe and spec (and no
        seed: a seeded search runs alone, so its seed means the same thing every time), run next as one batch."""
        with self.admission.slot():
            return await self._search(prompt, probe, spec, temperature, seed, on_step)

    async def _search(self, prompt, probe, spec, temperature, seed, on_step):
        loop = asyncio.get_running_loop()

        def step_cb(step):
            if _not_a_number(step.value):
                return  # the search fails when it ends (see _search_group); a NaN is never streamed
            if on_step is not None:
                loop.call_soon_threadsafe(on_step, step)

        job = _SearchJob(prompt, probe, spec, temperature if temperature and temperature > 0 else 0.8, seed, step_cb,
                         loop.create_future())
        self._searches.append(job)
        if self._search_drain is None or self._search_drain.done():
            self._search_drain = asyncio.ensure_future(self._drain(
                self._searches, self._search_group, self.metrics.search_batch_size if self.metrics else None))
        return await job.future

    async def _drain(self, waiting: list, run: Callable, batch_sizes=None):
        """Run the jobs in ``waiting`` on the generation thread, the first job's key and up to ``max_batch_size`` of
        its kind at a time (jobs that arrive while a batch runs join the next); each job's future gets its result,
        or the batch's exception. A job whose caller went away is not answered."""
        loop = asyncio.get_running_loop()
        while waiting:
            key = waiting[0].key
            group = [j for j in waiting if j.key == key and not j.future.done()][: self.max_batch_size]
            waiting[:] = [j for j in waiting if j not in group and not j.future.done()]
            if not group:
                continue
            if batch_sizes is not None:
                batch_sizes.observe(len(group))
            try:
                results = await loop.run_in_executor(self.generate_executor, run, group)
            except Exception as exc:  # noqa: BLE001 - each waiting request gets the failure
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            for j, r in zip(group, results):
                if j.future.done():
                    continue
                if isinstance(r, Exception):  # this job's own failure; the others of its batch are answered
                    j.future.set_exception(r)
                else:
                    j.future.set_result(r)

    async def generate(self, prompt: Prompt, probe: ValueProbe, *, max_new_tokens: int, temperature=None, top_p=None,
                       seed=None, stop=None, policy=None, answer_probe: ValueProbe | None = None,
                       logprobs: int | None = None, stream: bool = False):
        """The engine stream of one request (see :class:`~valueprobe.server.engines.base.EngineClient`): generated
        with ``probe`` reading the prefill (see :meth:`_generate_batch`), batched with the generations that wait
        beside it, streamed or not. Closing the stream stops the request's row. Batched greedy decoding can differ
        from one-prompt decoding where two tokens' logits are within rounding of each other (padding changes the
        arithmetic), as in any batching server."""
        with self.admission.slot():
            loop = asyncio.get_running_loop()
            job = _GenerateJob(prompt, probe, max_new_tokens, temperature, top_p, seed, list(stop or []), policy,
                               future=loop.create_future(), answer_probe=answer_probe, logprobs=logprobs,
                               stream=stream, events=asyncio.Queue(), loop=loop)
            self._waiting_generations.append(job)
            if self._generation_drain is None or self._generation_drain.done():
                self._generation_drain = asyncio.ensure_future(self._drain(
                    self._waiting_generations, self._generate_batch,
                    self.metrics.generation_batch_size if self.metrics else None))
            try:
                while True:
                    getter = asyncio.ensure_future(job.events.get())
                    await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                        continue
                    getter.cancel()
                    while not job.events.empty():  # what the thread handed over before the batch ended
                        yield job.events.get_nowait()
                    yield Finished(job.future.result())  # raises this request's failure
                    return
            finally:
                job.stop_flag.event.set()  # closed early (not answered here, or the client went away): the row stops
                if not job.future.done():
                    job.future.cancel()  # nobody waits for it: the batch leaves it unanswered


class _RowStreamer:
    """A ``generate`` streamer for a batch: each streaming job's new tokens decoded as they come (the decoded text
    grows; a piece is what it grew by, held back while it ends in an incomplete character), up to the row's end
    of answer, token limit or stop. Runs on the generation thread; pieces reach each request's stream through
    :meth:`_GenerateJob.emit`."""

    def __init__(self, engine: TransformersEngine, jobs: list[_GenerateJob]):
        self.engine, self.jobs = engine, jobs
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [0] * len(jobs)  # characters of each row's text already emitted
        self.ended = [not j.stream for j in jobs]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate puts the prompt ids first
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[i]
            if self.ended[i]:
                continue
            if job.stop_flag.event.is_set() or token in self.engine.eos_ids or len(self.tokens[i]) >= job.max_new_tokens:
                self._finish(i)
                continue
            self.tokens[i].append(token)
            self._send(i, final=False)

    def end(self) -> None:
        for i in range(len(self.jobs)):
            if not self.ended[i]:
                self._finish(i)

    def _finish(self, i: int) -> None:
        self._send(i, final=True)  # what was held back (an incomplete character the answer ends in)
        self.ended[i] = True

    def _send(self, i: int, *, final: bool) -> None:
        text = self.engine.decode(self.tokens[i])
        if len(text) > self.sent[i] and (final or not text.endswith("\ufffd")):
            self.jobs[i].emit(Piece(text[self.sent[i]:]))
            self.sent[i] = len(text)
