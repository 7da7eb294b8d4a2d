"""The model side of the sidecar (no FastAPI here): dynamic batching of prompt-only scoring, and embedded
generation with the probe's hook reading the prefill of the same forward pass.

All model work runs on one worker thread, in order, so the hook state is never shared between two forward
passes, and an artifact swap (hot reload) queued on that thread lands between requests: in-flight requests finish
on the old artifact.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from valueprobe.plugin import ProbeResult, ValueProbe
from valueprobe.plugin.hooks import LastTokenReader, capture, with_position_ids
from valueprobe.plugin.models import eos_token_ids

from .errors import OverloadedError, ProbeNotLoadedError


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    confidence: ProbeResult


class _StopFlag:
    """A StoppingCriteria-compatible callable that ends generation when set (abstain/escalate while streaming)."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class Engine:
    def __init__(self, model, tokenizer, probe: ValueProbe, *, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 max_queue: int = 64, metrics=None):
        self.model, self.tokenizer, self.probe = model, tokenizer, probe
        self.max_batch_size, self.max_wait_s, self.metrics = max_batch_size, max_wait_ms / 1000, metrics
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="valueprobe-model")
        self.device = next(model.parameters()).device
        self._batcher: asyncio.Task | None = None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self):
        self._batcher = asyncio.create_task(self._batch_loop())

    async def stop(self):
        if self._batcher:
            self._batcher.cancel()
            try:
                await self._batcher
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def reload(self, path: str, *, check_fingerprint: bool = True) -> ValueProbe:
        """Load and check a new artifact, then swap it in on the model thread (between requests)."""
        new = await asyncio.get_running_loop().run_in_executor(None, ValueProbe.load, path)
        await self.run(functools.partial(new.check_compatible, self.model, self.tokenizer, strict=check_fingerprint))

        def swap():
            self.probe = new

        await self.run(swap)
        return new

    # -- prompt-only scoring, dynamically batched ----------------------------------------------------------------
    async def score(self, text: str) -> ProbeResult:
        """Score one rendered prompt; batched with concurrent callers. Raises OverloadedError when the queue is full."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((text, future))
        except asyncio.QueueFull:
            raise OverloadedError("scoring queue is full; retry shortly") from None
        if self.metrics:
            self.metrics.queue_depth.set(self.queue.qsize())
        return await future

    async def _batch_loop(self):
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            if self.metrics:
                self.metrics.queue_depth.set(self.queue.qsize())
                self.metrics.batch_size.observe(len(batch))
            live = [(t, f) for t, f in batch if not f.done()]
            if not live:
                continue
            try:
                results = await self.run(self._score_texts, [t for t, _ in live])
            except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), r in zip(live, results):
                if not f.done():
                    f.set_result(r)

    def _encode(self, texts: list[str]):
        # Rendered texts already carry the chat template's special tokens.
        return self.probe.prompt_format.tokenize(self.tokenizer, texts).to(self.device)

    @torch.inference_mode()
    def _score_texts(self, texts: list[str]) -> list[ProbeResult]:
        probe = self.probe
        enc = self._encode(texts)
        started = time.perf_counter()
        with capture(self.model, [probe.layer], probe.neuron_indices, stop_after=True) as cap:
            self.model(**with_position_ids(enc), use_cache=False)
        t_readout = time.perf_counter()
        results = probe.readout(cap.batches[0][probe.layer])
        if self.metrics:
            self.metrics.prefill_latency.observe(t_readout - started)
            self.metrics.probe_latency.observe(time.perf_counter() - t_readout)
        return results

    # -- embedded generation --------------------------------------------------------------------------------------
    def _gen_kwargs(self, max_new_tokens: int, temperature: float | None, top_p: float | None, seed: int | None):
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p or 1.0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.inference_mode()
    def _generate(self, text: str, max_new_tokens: int, temperature, top_p, seed, stop: list[str],
                  on_confidence=None, streamer=None, stop_flag=None) -> Generation:
        from transformers import StoppingCriteriaList

        probe = self.probe
        enc = self._encode([text])
        seen: list[ProbeResult] = []

        def on_prefill(values):
            result = probe.readout(values[probe.layer])[0]
            seen.append(result)
            if on_confidence:
                on_confidence(result)

        reader = LastTokenReader(self.model, [probe.layer], on_prefill, neuron_indices=probe.neuron_indices).register()
        try:
            extra = {}
            if streamer is not None:
                extra["streamer"] = streamer
            if stop_flag is not None:
                extra["stopping_criteria"] = StoppingCriteriaList([stop_flag])
            out = self.model.generate(**enc, **self._gen_kwargs(max_new_tokens, temperature, top_p, seed), **extra)
        finally:
            reader.remove()
        if not seen:
            raise ProbeNotLoadedError("the probe hook did not fire during the prefill")
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        eos = eos_token_ids(self.model, self.tokenizer)
        stopped = next((i for i, t in enumerate(new) if t in eos), None)
        tokens = new if stopped is None else new[:stopped]
        generated = self.tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "stop" if stopped is not None else "length"
        for s in stop or []:
            if s and s in generated:
                generated, finish = generated.split(s, 1)[0], "stop"
        return Generation(generated, int(enc["input_ids"].shape[1]), len(tokens), finish, seen[0])

    async def generate(self, text: str, *, max_new_tokens: int, temperature=None, top_p=None, seed=None,
                       stop=None) -> Generation:
        return await self.run(self._generate, text, max_new_tokens, temperature, top_p, seed, stop or [])

    async def generate_stream(self, text: str, *, max_new_tokens: int, temperature=None, top_p=None, seed=None,
                              stop=None):
        """Start a streamed generation. Returns ``(confidence, pieces, stop_flag, done)``: the confidence is
        awaited (it is known at prefill, before the first token), ``pieces`` is an async iterator of text,
        setting ``stop_flag.event`` ends generation early, ``done`` resolves to the :class:`Generation`."""
        from transformers import TextIteratorStreamer

        loop = asyncio.get_running_loop()
        confidence = loop.create_future()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        stop_flag = _StopFlag()

        def on_confidence(result):
            loop.call_soon_threadsafe(lambda: confidence.done() or confidence.set_result(result))

        done = loop.run_in_executor(self.executor, self._generate, text, max_new_tokens, temperature, top_p, seed,
                                    stop or [], on_confidence, streamer, stop_flag)

        def _fail_confidence(fut):
            if fut.exception() and not confidence.done():
                loop.call_soon_threadsafe(confidence.set_exception, fut.exception())
                streamer.end()

        done.add_done_callback(_fail_confidence)

        async def pieces():
            iterator = iter(streamer)
            while True:
                piece = await loop.run_in_executor(None, next, iterator, None)
                if piece is None:
                    return
                if piece:
                    yield piece

        result = await confidence
        return result, pieces(), stop_flag, done
