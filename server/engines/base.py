"""What every engine offers the sidecar, declared once: the shared data classes, thread-safe tokenizer access,
admission, and the :class:`EngineClient` protocol that :class:`~valueprobe.server.service.Sidecar` holds.

An engine says what it can do (``supports_search``) instead of the sidecar probing it with ``hasattr``; to add
one, implement :class:`EngineClient` in a module of its own beside ``transformers_engine`` and ``vllm_engine`` and
build it in ``server/app.py``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Union, runtime_checkable

import torch

from valueprobe.plugin import ProbeResult, ValueProbe

from ..errors import OverloadedError, ProbeFailedError

__all__ = ["Admission", "EngineClient", "EngineEvent", "Finished", "Generation", "Piece", "Prefilled", "Prompt",
           "StopFlag", "TokenizerAccess", "final_generation", "not_finite_error"]


def not_finite_error(result: ProbeResult, probe: ValueProbe) -> ProbeFailedError | None:
    """The failure to give a request whose readout is not a number (its hidden state overflowed to inf/NaN, as a
    float16 model can on some prompts), else ``None``. Checked per row, so the other requests of its batch are
    answered; a NaN confidence is never served (it would also compare as "confident" in every policy)."""
    if math.isfinite(result.raw) and math.isfinite(result.probability):
        return None
    return ProbeFailedError(f"the model's state read by artifact {probe.artifact_id} (layer {probe.layer}) is not "
                            "finite for this prompt (inf or NaN: a float16 overflow, say; float32 or bfloat16 avoid "
                            "it); no confidence is given")


@dataclass(frozen=True)
class Prompt:
    """A rendered, tokenized prompt and its kind (``("choice", n_choices)`` or ``("open", 0)``)."""

    input_ids: tuple[int, ...]
    kind: tuple[str, int] = ("open", 0)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability under the model (raw logits, not the sampler's), and the
    ``top`` most likely tokens at that step as ``(id, text, logprob)``, when asked for."""

    id: int
    text: str
    logprob: float
    top: tuple = ()


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "aborted"
    confidence: ProbeResult
    #: confidence in this answer (an answer_end artifact read at its last token), when the engine was given one
    answer: ProbeResult | None = None
    #: the answer's tokens' log-probabilities under the model (with ``answer``)
    token_logprobs: list[float] | None = None
    #: the answer's token ids (up to a stop string's cut)
    token_ids: list[int] | None = None
    #: each answer token with its log-probability (and top alternatives), when the request asked for them
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Prefilled:
    """The first event of every generation: the prompt's confidence, read at the prefill, and the policy's decision
    on it, taken once by the engine before the first decode step (a request not answered here stops there;
    ``"answer"`` when no policy was given)."""

    confidence: ProbeResult
    decision: str


@dataclass(frozen=True)
class Piece:
    """Text decoded since the last piece (streamed generations only)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The last event: the whole generation (text cut at a stop string, usage, token log-probabilities, the
    answer-level readout)."""

    generation: Generation


EngineEvent = Union[Prefilled, Piece, Finished]


async def final_generation(events: AsyncIterator[EngineEvent]) -> Generation:
    """The :class:`Generation` an engine stream ends with (a whole answer is a fold over the same stream)."""
    try:
        async for event in events:
            if isinstance(event, Finished):
                return event.generation
    finally:
        await events.aclose()
    raise ProbeFailedError("the generation ended without a result")


class StopFlag:
    """A StoppingCriteria-compatible callable that ends generation when set (decided not to answer, client gone)."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TokenizerAccess:
    """Thread-safe use of one Hugging Face tokenizer, shared by both engines: a fast tokenizer must not be used
    from two threads at once ("Already borrowed"), so every encode and decode takes ``_tokenizer_lock``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self._letters: dict[str, list[int]] = {}

    def tokenize(self, text: str, probe: ValueProbe) -> tuple[int, ...]:
        """Token ids of a rendered prompt (thread-safe; no special tokens where the chat template put them)."""
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=probe.prompt_format.adds_special_tokens(self.tokenizer))
        return tuple(ids["input_ids"])

    def tokenize_answer(self, text: str) -> tuple[int, ...]:
        """Token ids of an answer as the model would have generated it (no special tokens; thread-safe)."""
        with self._tokenizer_lock:
            return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def letter_ids(self, probe: ValueProbe, always: bool = False) -> list[int] | None:
        """The option letters' token ids, for artifacts that read the next-token distribution (cached per artifact);
        ``always``: whatever the artifact serves (an answer-level readout summarises the prompt's distribution)."""
        if not (always or probe.needs_next_token):
            return None
        key = probe.artifact_id
        if key not in self._letters:
            with self._tokenizer_lock:
                self._letters[key] = probe.letter_ids(self.tokenizer)
        return self._letters[key]


class Admission:
    """At most ``limit`` requests in flight; one more is refused with :class:`OverloadedError` (a polite 503).

    ``with admission.slot():`` holds a place for the block; a streamed answer that outlives the call which started
    it enters the slot in an :class:`contextlib.ExitStack` and closes the stack when the stream ends."""

    def __init__(self, limit: int, what: str = "requests"):
        self.limit, self.what = limit, what
        self.in_flight = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            raise OverloadedError(f"too many {self.what} in flight; retry shortly")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


@runtime_checkable
class EngineClient(Protocol):
    """The engine contract the sidecar relies on (the shape of vLLM's ``EngineClient``).

    Every call carries the probe it must use (the request's snapshot), so a hot reload never mixes two artifacts
    inside one request. ``generate`` is one async stream of :data:`EngineEvent` for whole and streamed answers
    alike: :class:`Prefilled` (confidence and ``policy.decide``'s decision, before any decoding), then
    :class:`Piece` s when ``stream``, then :class:`Finished`; closing the stream stops the generation. Generations
    that wait together run batched, streamed or not."""

    #: whether :meth:`search` (value-guided step search) is served
    supports_search: ClassVar[bool]
    #: whether ``generate(answer_probe=...)`` reads an answer-level artifact at each answer's end
    supports_answer_confidence: ClassVar[bool]
    #: whether :meth:`score_answers` scores answers generated elsewhere (one prefill of prompt + answer)
    supports_answer_scoring: ClassVar[bool]
    #: whether ``generate(logprobs=n)`` gives each answer token's log-probability and top ``n`` alternatives
    supports_logprobs: ClassVar[bool]
    tokenizer: Any
    probe: ValueProbe

    @property
    def context_length(self) -> int | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def attach(self, probe: ValueProbe, strict: bool = True) -> None: ...

    async def release_unused(self) -> list[str]: ...

    def tokenize(self, text: str, probe: ValueProbe) -> tuple[int, ...]: ...

    def tokenize_answer(self, text: str) -> tuple[int, ...]: ...

    def decode(self, ids) -> str: ...

    async def score(self, prompts: list[Prompt], probe: ValueProbe) -> list[ProbeResult]: ...

    async def score_answers(self, prompts: list[Prompt], answers: list[tuple[int, ...]], answer_probe: ValueProbe
                            ) -> list[ProbeResult]: ...

    async def attach_answer(self, answer_probe: ValueProbe, strict: bool = True) -> None: ...

    def generate(self, prompt: Prompt, probe: ValueProbe, *, max_new_tokens: int, temperature=None, top_p=None,
                 seed=None, stop=None, policy=None, answer_probe: ValueProbe | None = None,
                 logprobs: int | None = None, stream: bool = False) -> AsyncIterator[EngineEvent]: ...

    async def search(self, prompt: Prompt, probe: ValueProbe, spec, *, temperature=None, seed=None, on_step=None): ...
