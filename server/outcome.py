"""One request after validation (:class:`Query`), what came of it (:class:`Outcome`) and the events of the one
answer flow (:class:`Head`, :class:`Text`, :class:`StepEvent`, :class:`Final`) that every protocol renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from valueprobe.plugin import ProbeResult

from .engines.base import Prompt
from .policy import Served
from .routing import RouteInfo

__all__ = ["Event", "Final", "Head", "Outcome", "Query", "StepEvent", "Text"]


@dataclass
class Query:
    """One request after validation: what the probe scores (``rendered`` in the artifact's format, tokenized once as
    ``prompt``), and what whoever answers gets: an OpenAI-compatible upstream or escalation target ``messages``, the
    request as the user sent it; a TGI one ``sent_text``, the same through the chat template; the local model
    ``answer_prompt`` where it differs from ``prompt`` (``local_prompt: user``), else ``prompt`` itself."""

    messages: list[dict]
    rendered: str
    prompt: Prompt
    served: Served
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    search: object | None = None  # a protocol SearchSpec: answer by value-guided step search
    logprobs: int | None = None  # None: not asked; n: each answer token's log-probability and n alternatives
    #: the request as another valueprobe sidecar's ``/v1/confidence`` takes it (``prompt``/``choices`` or
    #: ``messages``, as the user sent them): how gain routing asks the escalation target for its probability
    source: dict = field(default_factory=dict)
    #: the request as the user sent it, as model text (for TGI upstreams); None where nobody needs it
    sent_text: str | None = None
    #: what the local model answers when it is not ``prompt`` (``local_prompt: user``); None: ``prompt``
    answer_prompt: Prompt | None = None

    @property
    def text_for_upstream(self) -> str:
        """What a TGI upstream or escalation target gets: the request as sent, as model text."""
        return self.sent_text if self.sent_text is not None else self.rendered

    @property
    def local_prompt(self) -> Prompt:
        """What the local model answers from."""
        return self.answer_prompt if self.answer_prompt is not None else self.prompt


@dataclass(frozen=True)
class Outcome:
    confidence: ProbeResult
    decision: str
    request_id: str
    artifact_id: str
    text: str = ""
    routed: bool = False
    upstream_error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    search: dict | None = None  # strategy, steps [{text, value}], tokens_generated, candidates_scored
    answer: ProbeResult | None = None  # confidence in the answer given (an answer_end artifact), local answers only
    answer_flagged: bool | None = None  # answer.probability below --flag-below
    local_text: str | None = None  # the local answer an answer-level escalation replaced
    logprobs: list | None = None  # TokenLogprob per answer token, when asked for and answered here
    route: RouteInfo | None = None  # gain routing's decision (--escalate-gain-above / --escalate-gain-rate)
    answer_error: str | None = None  # an answer-level artifact is served but its readout failed for this answer


@dataclass(frozen=True)
class Head:
    """The decision, known at the prefill: confidence, decision, routing (text empty)."""

    outcome: Outcome


@dataclass(frozen=True)
class Text:
    """A piece of the answer's text."""

    piece: str


@dataclass(frozen=True)
class StepEvent:
    """A step kept by value-guided search, with the value it was kept for."""

    step: object  # valueprobe.plugin.search.Step


@dataclass(frozen=True)
class Final:
    """The whole answer: text, usage, finish reason, routing, search record."""

    outcome: Outcome


Event = Union[Head, Text, StepEvent, Final]
