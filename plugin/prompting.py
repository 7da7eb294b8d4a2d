"""The prompt format: how a question becomes the text whose last token the probe reads.

The probe only means something on prompts rendered exactly as at fit time, so the format is recorded in the
artifact and ``ValueProbe.score`` re-applies it. Three prompt shapes are accepted everywhere:

* ``str``: an open question, rendered with ``open_template``;
* ``{"question": ..., "choices": [...]}``: multiple choice, rendered with ``choices_template`` and lettered
  options;
* ``[{"role": ..., "content": ...}, ...]``: a chat conversation, rendered by the tokenizer's chat template as
  given (the caller owns its content).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

__all__ = ["Prompt", "PromptFormat", "PromptError", "pad_left", "pad_token_id"]

Prompt = Union[str, Mapping[str, Any], Sequence[Mapping[str, str]]]


class PromptError(ValueError):
    """A prompt that cannot be rendered (wrong shape, empty, or chat messages without a chat template)."""


@dataclass(frozen=True)
class PromptFormat:
    """How questions are turned into model input text.

    Parameters
    ----------
    use_chat_template:
        Render through ``tokenizer.apply_chat_template`` (with the generation prompt). When the tokenizer has no
        template, ``plain_template`` wraps the user text instead.
    system:
        Optional system message for chat rendering.
    open_template:
        User text for an open question; ``{question}`` is substituted.
    choices_template:
        User text for multiple choice; ``{question}`` and ``{choices}`` (lines ``"A. ..."``) are substituted.
    plain_template:
        Used without a chat template; ``{user}`` is the user text.
    letters:
        Option letters, in order.
    """

    use_chat_template: bool = True
    system: str | None = None
    open_template: str = "{question}\n\nAnswer the question briefly, with just the answer."
    choices_template: str = "{question}\n{choices}\nAnswer with the letter only."
    plain_template: str = "Question: {user}\nAnswer:"
    letters: str = "ABCDEFGHIJ"
    extra: dict[str, str] = field(default_factory=dict)

    # -- serialisation ---------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PromptFormat:
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise PromptError(f"unknown prompt format fields: {sorted(unknown)}")
        return cls(**data)

    # -- rendering -------------------------------------------------------------------------------------------
    def chat_active(self, tokenizer) -> bool:
        return self.use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    def user_text(self, prompt: str | Mapping[str, Any]) -> str:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("empty prompt")
            return self.open_template.format(question=prompt.strip())
        question = str(prompt.get("question", "")).strip()
        if not question:
            raise PromptError("a question dict needs a non-empty 'question'")
        choices = prompt.get("choices")
        if not choices:
            return self.open_template.format(question=question)
        if len(choices) > len(self.letters):
            raise PromptError(f"at most {len(self.letters)} choices are supported, got {len(choices)}")
        lines = "\n".join(f"{self.letters[i]}. {str(c).strip()}" for i, c in enumerate(choices))
        return self.choices_template.format(question=question, choices=lines)

    def render(self, tokenizer, prompt: Prompt) -> str:
        """Return the exact text fed to the model (special tokens included when a chat template adds them)."""
        if isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)):
            messages = list(prompt)
            if not messages or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
                raise PromptError("a chat prompt is a non-empty list of {'role', 'content'} messages")
            if not self.chat_active(tokenizer):
                raise PromptError("chat messages need a tokenizer with a chat template")
            return _apply_template(tokenizer, messages)
        if not isinstance(prompt, (str, Mapping)):
            raise PromptError(f"unsupported prompt type {type(prompt).__name__}")
        user = self.user_text(prompt)
        if self.chat_active(tokenizer):
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": user}
            ]
            return _apply_template(tokenizer, messages)
        return self.plain_template.format(user=user)

    def adds_special_tokens(self, tokenizer) -> bool:
        """Whether the tokenizer should add special tokens: not when the chat template already did."""
        return not self.chat_active(tokenizer)

    def tokenize(self, tokenizer, texts: list[str]):
        """Tokenize rendered texts left-padded (so the last column is every row's last real token), without
        adding special tokens a chat template already put in, and without ``token_type_ids`` (which some
        models' ``generate`` refuses).

        Padding is done here, not by the tokenizer: tokenizers without a pad token (Llama-family ones) work, and
        the caller's tokenizer is never mutated (no ``padding_side`` or ``pad_token`` change, which would also
        race with other threads using it). Padded positions are masked, so the pad id is immaterial.
        """
        rows = [tokenizer(t, add_special_tokens=self.adds_special_tokens(tokenizer))["input_ids"] for t in texts]
        return pad_left(rows, pad_token_id(tokenizer))

    def letter_token_ids(self, tokenizer, n_choices: int) -> list[int]:
        """Token ids of the option letters as the model's next token (``"A"`` after a chat generation prompt,
        ``" A"`` after a plain ``Answer:``)."""
        prefix = "" if self.chat_active(tokenizer) else " "
        ids = []
        for letter in self.letters[:n_choices]:
            toks = tokenizer.encode(prefix + letter, add_special_tokens=False)
            ids.append(toks[-1])
        return ids


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0: padded positions are masked, any real id will do."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def pad_left(rows: list[list[int]], pad_id: int):
    """Left-pad token id lists into a ``BatchEncoding`` with ``input_ids`` and ``attention_mask``."""
    import torch
    from transformers import BatchEncoding

    if not rows or any(len(r) == 0 for r in rows):
        raise PromptError("a prompt tokenized to no tokens")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return BatchEncoding({"input_ids": ids, "attention_mask": mask})


def _apply_template(tokenizer, messages) -> str:
    """The chat template, with its own refusals (``raise_exception`` in Jinja: "roles must alternate", ...)
    turned into :class:`PromptError`, a client error, instead of escaping as a server error."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        raise PromptError(f"the chat template refused these messages: {exc}") from None
