"""Any protocol's request turned into one :class:`~valueprobe.server.outcome.Query`: size limits, rendering with
the artifact's prompt format (or the chat template) for the probe and as the user sent it for whoever answers
(upstream, escalation target, and the local model under ``local_prompt: user``), tokenizing once, the context check, greedy below
:data:`SAMPLING_EPS`, and which token log-probabilities can be served. Routes and consumers reach it only through
:meth:`~valueprobe.server.service.Sidecar.prepare`."""

from __future__ import annotations

from valueprobe.plugin import PromptError
from valueprobe.plugin.nexttoken import prompt_kind

from .engines.base import Prompt
from .errors import ClientError
from .outcome import Query
from .policy import Served

__all__ = ["Preparation", "SAMPLING_EPS"]

# Temperatures below this decode greedily (vLLM's _SAMPLING_EPS): every route and both engines go through
# Preparation.prepare, so this is the one place that decides it.
SAMPLING_EPS = 1e-5


class Preparation:
    def __init__(self, settings, engine):
        self.settings, self.engine = settings, engine

    def check_size(self, text: str, what: str = "prompt"):
        if len(text) > self.settings.max_prompt_chars:
            raise ClientError(f"{what} is {len(text)} characters; the limit is {self.settings.max_prompt_chars}")

    def _render_question(self, served: Served, question: str, choices=None) -> tuple[list[dict], str, tuple[str, int]]:
        """``(sent, rendered, kind)``: the request as the user sent it (one user message: the question as is; a
        multiple-choice question as the artifact's format lists its options, the only text it has), and the
        artifact's rendering, which the probe scores."""
        self.check_size(question)
        prompt = {"question": question, "choices": choices} if choices else question
        fmt = served.probe.prompt_format
        try:
            rendered = fmt.render(self.engine.tokenizer, prompt)
            sent = fmt.user_text(prompt) if choices else question
        except PromptError as exc:
            raise ClientError(str(exc)) from None
        return [{"role": "user", "content": sent}], rendered, prompt_kind(prompt)

    def _render_messages(self, served: Served, messages: list[dict]) -> tuple[list[dict], str, tuple[str, int]]:
        """A single user message is a question and is scored in the artifact's format (what the probe was fitted
        on); longer conversations are rendered by the chat template as given. Either way ``sent`` is the messages
        as given."""
        for m in messages:
            self.check_size(m["content"])
        sent = [dict(m) for m in messages]
        if len(messages) == 1 and messages[0]["role"] == "user":
            _, rendered, kind = self._render_question(served, messages[0]["content"])
            return sent, rendered, kind
        try:
            return sent, served.probe.prompt_format.render(self.engine.tokenizer, messages), ("open", 0)
        except PromptError as exc:
            raise ClientError(str(exc)) from None

    def _as_sent(self, served: Served, sent: list[dict], choices) -> str:
        """The user's request as model text, for whoever takes text rather than messages (a TGI upstream or
        escalation target, the local model under ``local_prompt: user``): the messages through the chat template as
        sent (without one: the question as sent)."""
        fmt = served.probe.prompt_format
        if fmt.chat_active(self.engine.tokenizer):
            try:
                return fmt.render(self.engine.tokenizer, sent)
            except PromptError as exc:
                raise ClientError(str(exc)) from None
        return fmt.plain_template.format(user=sent[0]["content"]) if choices else sent[0]["content"]

    def _needs_sent_text(self) -> bool:
        s = self.settings
        return (s.mode == "embedded" and s.local_prompt == "user") or "tgi" in (
            s.upstream_kind if s.mode == "gateway" else None, s.escalate_kind if s.escalate_url else None)

    def max_new_tokens(self, requested: int | None) -> int:
        n = requested or self.settings.default_max_new_tokens
        if n > self.settings.max_new_tokens_limit:
            raise ClientError(f"max tokens {n} exceeds the limit {self.settings.max_new_tokens_limit}")
        return n

    def _tokenized(self, served: Served, rendered: str, kind=("open", 0), max_new_tokens: int = 0) -> Prompt:
        """Tokenize once, and refuse a prompt that cannot fit the model's context before any model work."""
        ids = self.engine.tokenize(rendered, served.probe)
        if not ids:
            raise ClientError("the prompt is empty after tokenization")
        context = self.engine.context_length
        if context and len(ids) + max_new_tokens > context:
            raise ClientError(f"prompt ({len(ids)} tokens) plus max tokens ({max_new_tokens}) exceeds the model's "
                              f"context of {context}")
        return Prompt(ids, kind)

    def prepare(self, served: Served, *, question: str | None = None, choices=None,
                messages: list[dict] | None = None, raw: str | None = None, max_new_tokens: int | None = None,
                temperature: float | None = None, top_p: float | None = None, seed: int | None = None, stop=None,
                search=None, logprobs: int | None = None, stream: bool = False, scoring_only: bool = False) -> Query:
        """Any protocol's request as one :class:`Query`, the only way routes and consumers build one.

        Exactly one of ``question`` (with ``choices`` for multiple choice; scored in the artifact's format),
        ``messages`` (a single user message is a question; longer chats go through the chat template as given) or
        ``raw`` (TGI's ``inputs``: the model's text as is). The upstream and the escalation target get the request
        as sent (``Query.messages``, ``Query.sent_text``), never the artifact's rendering of it. ``scoring_only``: a prompt to score, nothing to
        generate (``/v1/confidence``, ``/classify``, the detectors). Greedy below a temperature of
        :data:`SAMPLING_EPS`; the prompt is tokenized once and refused if it cannot fit the context."""
        if sum(x is not None for x in (question, messages, raw)) != 1:
            raise ClientError("a request needs exactly one of a question, messages or raw text")
        sent_text = None
        if question is not None:
            sent, rendered, kind = self._render_question(served, question, choices)
            source = {"prompt": question, **({"choices": list(choices)} if choices else {})}
        elif messages is not None:
            sent, rendered, kind = self._render_messages(served, messages)
            source = {"messages": [dict(m) for m in messages]}
        else:
            self.check_size(raw)
            # TGI semantics: ``raw`` is the model's text; OpenAI upstreams get it as one user message
            sent, rendered, kind, sent_text = [{"role": "user", "content": raw}], raw, ("open", 0), raw
            source = {"messages": sent}
        n_new = 0 if scoring_only else self.max_new_tokens(max_new_tokens)
        if sent_text is None and not scoring_only and self._needs_sent_text():
            sent_text = self._as_sent(served, sent, choices)
        if temperature is not None and temperature < SAMPLING_EPS:
            temperature = None  # greedy, as vLLM does: dividing logits by a subnormal temperature overflows them
        if logprobs is not None:
            self._check_logprobs(search)
        prompt = self._tokenized(served, rendered, kind, n_new)
        answer_prompt = None
        if (sent_text is not None and sent_text != rendered and self.settings.mode == "embedded"
                and self.settings.local_prompt == "user" and search is None):
            # the local model answers the request as sent; the probe still scores the artifact's rendering
            answer_prompt = self._tokenized(served, sent_text, kind, n_new)
        return Query(sent, rendered, prompt, served, n_new, temperature, top_p, seed, list(stop or []), search,
                     logprobs, source, sent_text=sent_text, answer_prompt=answer_prompt)

    @property
    def serves_logprobs(self) -> bool:
        """Whether whole responses can carry token log-probabilities (embedded mode, an engine that gives them)."""
        return self.settings.mode == "embedded" and self.engine.supports_logprobs

    def _check_logprobs(self, search) -> None:
        """Token log-probabilities are served where this sidecar generates the answer, whole or streamed (a stream
        carries them in its final chunk); every other combination is refused with the reason (never answered with
        an empty field)."""
        where = None
        if self.settings.mode != "embedded":
            where = "in gateway mode (the upstream generates: ask it)"
        elif not self.engine.supports_logprobs:
            where = f"by the {self.settings.engine} engine"
        elif search is not None:
            where = "with search"
        if where:
            raise ClientError(f"token log-probabilities are not served {where}")
