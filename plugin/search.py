"""Step-level search guided by a value read from the model's own states (a process reward model for free).

A reasoning answer is built one step (one line) at a time. At each round ``width`` candidate next steps are
sampled from the current prefix in one batched ``generate``; while they are generated, the hook records the
state at every candidate's last token (the token carrying its newline), so each candidate is scored by
``value(state)`` with no extra pass (one extra decode step lets the last-finishing candidate's newline be fed).

Strategies:

* ``value-beam``: keep the ``beam`` best prefixes by value (``beam=1``: greedy in value), until an answer line or
  the end-of-answer token, or ``max_steps``;
* ``random``: the same loop keeping a random candidate (the control at equal token budget);
* ``best-of-n``: ``width`` whole answers, the one whose final state has the highest value;
* ``self-consistency``: ``width`` whole answers, majority vote over their final answers (needs ``extract``).

``value`` maps ``[n, k]`` neuron values (the probe's ``neuron_indices`` at its ``layer``) to scores, e.g. a
:class:`~valueprobe.plugin.probe.ValueProbe`'s ``predict_proba``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .hooks import StepStateRecorder
from .models import eos_token_ids
from .prompting import pad_left, pad_token_id

__all__ = ["SearchResult", "Step", "search", "STRATEGIES", "newline_token_ids"]

STRATEGIES = ("value-beam", "random", "best-of-n", "self-consistency")


@dataclass(frozen=True)
class Step:
    text: str
    value: float | None


@dataclass
class SearchResult:
    text: str
    steps: list[Step]
    tokens_generated: int
    strategy: str
    candidates_scored: int = 0
    votes: dict = field(default_factory=dict)
    #: value-beam / random: every candidate of every round, ``(token ids after the prompt, Step)``
    rounds: list = field(default_factory=list)


class _EndOneAfter:
    """Stopping criterion: a row is done one token *after* it produced an end token (newline or end-of-answer),
    so that token is fed once and its state recorded."""

    def __init__(self, end_ids: set[int], prompt_len: int):
        self.end_ids, self.prompt_len = end_ids, prompt_len
        self.ended: dict[int, int] = {}

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for r in range(input_ids.shape[0]):
            if r not in self.ended and int(input_ids[r, -1]) in self.end_ids:
                self.ended[r] = input_ids.shape[1] - self.prompt_len - 1  # index of the end token
                done.append(False)
            else:
                done.append(r in self.ended)
        return torch.tensor(done, dtype=torch.bool)


_NEWLINES: dict[tuple[int, int], set[int]] = {}


def newline_token_ids(tokenizer) -> set[int]:
    """Vocabulary entries that contain a newline (a step ends at the first of them); cached per tokenizer."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _NEWLINES:
        vocab = tokenizer.get_vocab()
        _NEWLINES[key] = {i for tok, i in vocab.items() if "\n" in tokenizer.convert_tokens_to_string([tok])}
    return _NEWLINES[key]


@torch.inference_mode()
def _sample(model, tokenizer, prefix_ids: list[int], n: int, *, layer: int, neuron_indices, end_ids: set[int],
            max_new_tokens: int, temperature: float, eos: set[int]):
    """``n`` continuations of ``prefix_ids`` each ending at its first token in ``end_ids`` (or at
    ``max_new_tokens``), with the probe's neuron values at that last token. Returns ``[(ids, values or None)]``
    and the number of tokens generated."""
    device = next(model.parameters()).device
    enc = pad_left([list(prefix_ids)] * n, pad_token_id(tokenizer)).to(device)
    stop = _EndOneAfter(end_ids, enc["input_ids"].shape[1])
    from transformers import StoppingCriteriaList

    with StepStateRecorder(model, [layer], neuron_indices=neuron_indices, dtype=torch.float32) as rec:
        out = model.generate(**enc, max_new_tokens=max_new_tokens + 1, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_p=1.0, top_k=0,
                             stopping_criteria=StoppingCriteriaList([stop]), pad_token_id=pad_token_id(tokenizer),
                             eos_token_id=sorted(eos))
    states = rec.states()[layer]  # [n, forwards, k]; column g + 1 is the state after generated token g
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    results, spent = [], 0
    for r, tokens in enumerate(new):
        end = stop.ended.get(r)
        ids = tokens[: end + 1] if end is not None else tokens[:max_new_tokens]
        spent += len(ids)
        col = len(ids)  # state after the last kept token
        values = states[r, col] if col < states.shape[1] else None
        results.append((ids, values))
    return results, spent


def search(model, tokenizer, prompt_ids: Sequence[int], *, layer: int, neuron_indices,
           value: Callable[[torch.Tensor], np.ndarray] | None, strategy: str = "value-beam", width: int = 4,
           beam: int = 1, max_steps: int = 8, step_tokens: int = 64, answer_tokens: int = 256,
           temperature: float = 0.8, extract: Callable[[str], str] | None = None, seed: int = 0,
           on_step: Callable[[Step], None] | None = None, decode: Callable[[list[int]], str] | None = None
           ) -> SearchResult:
    """Search for an answer to the rendered, tokenized prompt ``prompt_ids`` (see the module docstring).

    ``on_step`` is called with each kept step (value-beam / random), e.g. to stream it. ``tokens_generated``
    counts every sampled token, kept or not: the budget to compare strategies at. ``decode(ids)`` (default: the
    tokenizer's, skipping special tokens) lets a server serialise tokenizer use across threads.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if width < 1 or beam < 1:
        raise ValueError("width and beam must be at least 1")
    if strategy in ("value-beam", "best-of-n") and value is None:
        raise ValueError(f"{strategy} needs a value function")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    decode = decode or (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    eos = eos_token_ids(model, tokenizer)
    idx = torch.as_tensor(neuron_indices, dtype=torch.long)

    def score(vals) -> float | None:
        if vals is None or value is None:
            return None
        return float(np.asarray(value(vals.reshape(1, -1)))[0])

    if strategy in ("best-of-n", "self-consistency"):
        cands, spent = _sample(model, tokenizer, list(prompt_ids), width, layer=layer, neuron_indices=idx,
                               end_ids=set(eos), max_new_tokens=answer_tokens, temperature=temperature, eos=eos)
        texts = [decode([t for t in ids if t not in eos]) for ids, _ in cands]
        values = [score(v) for _, v in cands]
        if strategy == "best-of-n":
            best = max(range(width), key=lambda i: -np.inf if values[i] is None else values[i])
            steps = [Step(line, None) for line in texts[best].split("\n") if line.strip()]
            return SearchResult(texts[best], steps, spent, strategy, width)
        if extract is None:
            raise ValueError("self-consistency needs extract(text) -> answer")
        answers = [extract(t) for t in texts]
        votes = Counter(a for a in answers if a)
        winner = votes.most_common(1)[0][0] if votes else ""
        best = answers.index(winner) if winner else 0
        return SearchResult(texts[best], [Step(line, None) for line in texts[best].split("\n") if line.strip()],
                            spent, strategy, width, dict(votes))

    newline = newline_token_ids(tokenizer) | set(eos)
    rounds = []
    beams: list[tuple[list[int], list[Step], bool]] = [([], [], False)]
    spent = scored = 0
    for _ in range(max_steps):
        pool = []
        for ids, steps, finished in beams:
            if finished:
                pool.append((ids, steps, True, steps[-1].value if steps else None))
                continue
            cands, used = _sample(model, tokenizer, list(prompt_ids) + ids, width, layer=layer, neuron_indices=idx,
                                  end_ids=newline, max_new_tokens=step_tokens, temperature=temperature, eos=eos)
            spent += used
            for cand, vals in cands:
                text = decode([t for t in cand if t not in eos])
                done = any(t in eos for t in cand) or (extract is not None and bool(extract(text))
                                                      and "answer" in text.lower())
                v = score(vals)
                scored += 1
                pool.append((ids + cand, steps + [Step(text.strip(), v)], done, v))
        rounds.append([(ids, steps[-1]) for ids, steps, done, _ in pool])
        if strategy == "random":
            rng.shuffle(pool)
            kept = pool[:beam]
        else:
            kept = sorted(pool, key=lambda c: -np.inf if c[3] is None else c[3], reverse=True)[:beam]
        beams = [(ids, steps, done) for ids, steps, done, _ in kept]
        if on_step is not None and beams[0][1]:
            on_step(beams[0][1][-1])
        if all(done for _, _, done in beams):
            break
    ids, steps, _ = beams[0]
    text = decode([t for t in ids if t not in eos])
    return SearchResult(text, steps, spent, strategy, scored, rounds=rounds)
