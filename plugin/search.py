"""Step-level search guided by a value read from the model's own states (a process reward model for free).

A reasoning answer is built one step (one line) at a time. At each round ``width`` candidate next steps are
sampled from the current prefix; the decoding loop feeds each candidate's last token (the one carrying its
newline) before it stops, so the state there — the value's input — and the next-token logits after it come from
the forward that generated the candidate: no extra pass. Every candidate keeps its own KV cache, so the kept one
is continued without prefilling its prefix again, and the candidates of many prompts share one batch
(:func:`search_many`), which is what makes an evaluation over hundreds of problems affordable on a CPU.

Strategies:

* ``value-beam``: keep the ``beam`` best prefixes by value (``beam=1``: greedy in value), until an answer line or
  the end-of-answer token, or ``max_steps``;
* ``random``: the same loop keeping a random candidate (the control at equal token budget);
* ``best-of-n``: ``width`` whole answers, the one whose final state has the highest value;
* ``self-consistency``: ``width`` whole answers, majority vote over their final answers (needs ``extract``);
* ``greedy``: one whole answer at temperature 0 (the baseline).

``value`` maps ``[n, k]`` neuron values (the probe's ``neuron_indices`` at its ``layer``) to scores, e.g. a
:class:`~valueprobe.plugin.probe.ValueProbe`'s ``predict_proba``. It is called once per prompt and round with
all that prompt's new candidates, so it may also score them against each other (a readout centred on their
mean, say); with ``beam > 1`` kept beams that already finished keep the score they had.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .hooks import StepStateRecorder, position_ids
from .kvcache import cache_from_layers, cache_layers
from .models import eos_token_ids
from .prompting import pad_left, pad_token_id

__all__ = ["SearchResult", "Step", "final_answer", "search", "search_many", "vote", "STRATEGIES", "newline_token_ids"]


def vote(answers: Sequence[str], weights: Sequence[float] | None = None) -> tuple[int, dict[str, float]]:
    """Majority vote over final answers: the index of the first answer whose summed weight is largest (ties go to
    the answer met first) and the totals per answer. No weights: one vote each (self-consistency). An empty answer
    votes for nothing; with no answers at all, index 0."""
    totals: dict[str, float] = {}
    for i, a in enumerate(answers):
        if a:
            totals[a] = totals.get(a, 0) + (1 if weights is None else float(weights[i]))
    if not totals:
        return 0, totals
    winner = max(totals, key=totals.get)  # max keeps the first of equal totals (dicts keep insertion order)
    return list(answers).index(winner), totals

STRATEGIES = ("value-beam", "random", "best-of-n", "self-consistency", "greedy")


# "Answer: 42", "the answer is $1,234.5", "answer = -3"
_ANSWER = re.compile(r"answer\s*(?:is|:)?\s*[:=]?\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)


def final_answer(text: str) -> str:
    """The number after the last "Answer:" (or "answer is"), else the last number in the text, else ''.

    The one grader of final answers: reasoning traces, the search benchmark and the sidecar's served search all
    call it, so what is served is what was measured."""
    found = _ANSWER.findall(text)
    if found:
        return found[-1].replace(",", "")
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "") if numbers else ""


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


_NEWLINES: dict[tuple[int, int], set[int]] = {}


def newline_token_ids(tokenizer) -> set[int]:
    """Vocabulary entries that contain a newline (a step ends at the first of them); cached per tokenizer."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _NEWLINES:
        vocab = tokenizer.get_vocab()
        _NEWLINES[key] = {i for tok, i in vocab.items() if "\n" in tokenizer.convert_tokens_to_string([tok])}
    return _NEWLINES[key]


class _Row:
    """A sequence that can be continued: its KV cache (one row, real positions only), the next-token logits after
    its last token, and the probe's neuron values at its last two tokens. Never mutated: continuing a row makes
    new ones, so a kept candidate and its siblings share nothing that changes."""

    __slots__ = ("kv", "logits", "state", "prev_state", "tokens")

    def __init__(self, kv, logits, state, prev_state, tokens):
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = kv  # per layer ([1, heads, L, d], [1, heads, L, d])
        self.logits: torch.Tensor = logits  # [V]
        self.state: torch.Tensor = state  # [k] at the last token
        self.prev_state: torch.Tensor | None = prev_state  # [k] at the token before it
        self.tokens: list[int] = tokens  # generated after the prompt

    @property
    def length(self) -> int:
        return int(self.kv[0][0].shape[2])

    def value_state(self, eos: set[int]) -> torch.Tensor | None:
        """The state a step's value is read at: its last token, or the one before a closing end-of-answer token
        (traces end their last step there too)."""
        if self.tokens and self.tokens[-1] in eos:
            return self.prev_state
        return self.state


@torch.inference_mode()
def _prefill(model, prompts: list[list[int]], reader: StepStateRecorder, pad_id: int) -> list[_Row]:
    """One forward over the left-padded prompts; a :class:`_Row` per prompt (padding stripped from its cache)."""
    enc = pad_left([list(p) for p in prompts], pad_id)
    device = next(model.parameters()).device
    mask = enc["attention_mask"]
    # logits of the last position only: all positions' would be rows x length x vocabulary floats
    out = model(input_ids=enc["input_ids"].to(device), attention_mask=mask.to(device),
                position_ids=position_ids(mask).to(device), use_cache=True, logits_to_keep=1)
    kv = cache_layers(out.past_key_values)
    state = reader.take_last(reader.layers[0])
    logits = out.logits[:, -1, :].float().clone()
    width = mask.shape[1]
    rows = []
    for r, p in enumerate(prompts):
        start = width - len(p)
        rows.append(_Row([(k[r : r + 1, :, start:], v[r : r + 1, :, start:]) for k, v in kv], logits[r],
                         state[r], None, []))
    return rows


def _sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    # one row whose state overflowed (inf/NaN) must not stop the batch's sampling; its values are not numbers and
    # its caller is told so
    probs = torch.softmax(torch.nan_to_num(logits / temperature, nan=0.0), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.inference_mode()
def _extend(model, rows: list[_Row], *, ends: set[int], max_new_tokens: int, temperature: float,
            generator: torch.Generator, reader: StepStateRecorder) -> list[_Row]:
    """Continue every row (in one lockstep batch, left-padded) until it has fed a token in ``ends`` or
    ``max_new_tokens`` tokens; the end token is fed too, so its state and the next-token logits after it are
    known and the row can be continued later. Finished rows leave the batch at once."""
    device = next(model.parameters()).device
    length = max(r.length for r in rows)
    kv = []
    for layer in range(len(rows[0].kv)):
        ks, vs = [], []
        for r in rows:
            k, v = r.kv[layer]
            pad = length - k.shape[2]
            ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)) if pad else k)
            vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)) if pad else v)
        kv.append((torch.cat(ks), torch.cat(vs)))
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        mask[i, length - r.length:] = 1
    positions = mask.sum(1)
    logits = torch.stack([r.logits for r in rows])
    states = torch.stack([r.state for r in rows])
    active = list(range(len(rows)))
    new: list[list[int]] = [[] for _ in rows]
    done: list[_Row | None] = [None] * len(rows)
    cache = cache_from_layers(kv)
    while active:
        token = _sample_next(logits, temperature, generator)
        for j, i in enumerate(active):
            new[i].append(int(token[j]))
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long, device=device)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions[:, None],
                    past_key_values=cache, use_cache=True)
        positions = positions + 1
        prev_states, states, logits = states, reader.take_last(reader.layers[0]), out.logits[:, -1, :].float()
        finished = [j for j, i in enumerate(active) if new[i][-1] in ends or len(new[i]) >= max_new_tokens]
        if not finished:
            continue
        kv = cache_layers(out.past_key_values)
        for j in finished:
            i = active[j]
            real = mask[j].bool()
            # copies, so a finished row holds nothing of the batch's tensors
            done[i] = _Row([(k[j : j + 1][:, :, real], v[j : j + 1][:, :, real]) for k, v in kv], logits[j].clone(),
                           states[j].clone(), prev_states[j].clone(), rows[i].tokens + new[i])
        keep = [j for j in range(len(active)) if j not in set(finished)]
        if keep:
            sel = torch.tensor(keep, device=device)
            cache = cache_from_layers([(k.index_select(0, sel), v.index_select(0, sel)) for k, v in kv])
            mask, positions, logits = mask[sel], positions[sel], logits[sel]
            states = states[sel.to(states.device)]  # the recorder keeps states on the CPU
        active = [active[j] for j in keep]
    return done  # type: ignore[return-value]


def search_many(model, tokenizer, prompts: Sequence[Sequence[int]], *, layer: int, neuron_indices,
                value: Callable[[torch.Tensor], np.ndarray] | Sequence[Callable] | None,
                strategy: str = "value-beam", width: int = 4, beam: int = 1, max_steps: int = 8,
                step_tokens: int = 64, answer_tokens: int = 256,
                temperature: float = 0.8, extract: Callable[[str], str] | None = None, seed: int = 0,
                on_step: Callable[[int, Step], None] | None = None, decode: Callable[[list[int]], str] | None = None
                ) -> list[SearchResult]:
    """Search for answers to several rendered, tokenized prompts at once (see the module docstring): every
    round's candidates of every prompt are sampled in one batch, each continuing its prefix's KV cache, so a
    prefix is never prefilled twice.

    ``on_step(i, step)`` is called with each kept step of prompt ``i`` (value-beam / random), e.g. to stream it.
    ``tokens_generated`` counts every sampled token, kept or not: the budget to compare strategies at.
    ``decode(ids)`` (default: the tokenizer's, skipping special tokens) lets a server serialise tokenizer use.
    ``greedy`` is one whole answer at temperature 0 (the baseline). ``value`` may be one function per prompt
    (e.g. a value head that never saw that prompt's problem)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if width < 1 or beam < 1:
        raise ValueError("width and beam must be at least 1")
    values_of = list(value) if isinstance(value, (list, tuple)) else [value] * len(prompts)
    if len(values_of) != len(prompts):
        raise ValueError("give one value function, or one per prompt")
    if strategy in ("value-beam", "best-of-n") and any(v is None for v in values_of):
        raise ValueError(f"{strategy} needs a value function")
    if strategy == "self-consistency" and extract is None:
        raise ValueError("self-consistency needs extract(text) -> answer")
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    decode = decode or (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    eos = set(eos_token_ids(model, tokenizer))
    idx = torch.as_tensor(neuron_indices, dtype=torch.long)

    def score(rows: list[_Row], i: int) -> list[float | None]:
        """Values of prompt ``i``'s candidates of one round, in one call of its value function (so a function
        may score candidates against each other, e.g. centred on their mean)."""
        states = [r.value_state(eos) for r in rows]
        have = [j for j, s in enumerate(states) if s is not None]
        out: list[float | None] = [None] * len(rows)
        if values_of[i] is None or not have:
            return out
        values = np.asarray(values_of[i](torch.stack([states[j].reshape(-1) for j in have])), dtype=np.float64)
        for j, v in zip(have, values.reshape(-1)):
            out[j] = float(v)
        return out

    def text_of(ids: list[int]) -> str:
        return decode([t for t in ids if t not in eos])

    def lines(text: str) -> list[Step]:
        return [Step(line.strip(), None) for line in text.split("\n") if line.strip()]

    with StepStateRecorder(model, [layer], neuron_indices=idx, dtype=torch.float32) as reader:
        roots = _prefill(model, [list(p) for p in prompts], reader, pad_token_id(tokenizer))
        if strategy in ("best-of-n", "self-consistency", "greedy"):
            n = 1 if strategy == "greedy" else width
            rows = _extend(model, [r for r in roots for _ in range(n)], ends=eos, max_new_tokens=answer_tokens,
                           temperature=0.0 if strategy == "greedy" else temperature, generator=generator,
                           reader=reader)
            results = []
            for i in range(len(prompts)):
                cands = rows[i * n : (i + 1) * n]
                texts = [text_of(r.tokens) for r in cands]
                spent = sum(len(r.tokens) for r in cands)
                if strategy == "self-consistency":
                    answers = [extract(t) for t in texts]
                    best, votes = vote(answers)
                    results.append(SearchResult(texts[best], lines(texts[best]), spent, strategy, n, votes))
                    continue
                values = score(cands, i)
                best = max(range(n), key=lambda j: -np.inf if values[j] is None else values[j])
                steps = lines(texts[best])
                if steps:  # the whole answer's value, on its last line
                    steps[-1] = Step(steps[-1].text, values[best])
                results.append(SearchResult(texts[best], steps, spent, strategy, n if values_of[i] else 0))
            return results

        newline = newline_token_ids(tokenizer) | eos
        # per prompt: the kept beams as (row, steps, finished)
        beams: list[list[tuple[_Row, list[Step], bool]]] = [[(r, [], False)] for r in roots]
        rounds: list[list] = [[] for _ in prompts]
        spent, scored = [0] * len(prompts), [0] * len(prompts)
        for _ in range(max_steps):
            owners = [(i, b) for i, kept in enumerate(beams) for b in kept if not b[2]]
            if not owners:
                break
            cands = _extend(model, [b[0] for _, b in owners for _ in range(width)], ends=newline,
                            max_new_tokens=step_tokens, temperature=temperature, generator=generator, reader=reader)
            pools: dict[int, list] = {i: [(r, s, True, s[-1].value if s else None) for r, s, f in beams[i] if f]
                                      for i, _ in owners}
            fresh: dict[int, list] = {}
            for c, row in enumerate(cands):
                i, (parent, steps, _) = owners[c // width]
                new = row.tokens[len(parent.tokens):]
                text = text_of(new)
                finished = any(t in eos for t in new) or (extract is not None and bool(extract(text))
                                                          and "answer" in text.lower())
                spent[i] += len(new)
                scored[i] += 1
                fresh.setdefault(i, []).append((row, steps, text, finished))
            for i, items in fresh.items():
                for (row, steps, text, finished), v in zip(items, score([row for row, *_ in items], i)):
                    pools[i].append((row, steps + [Step(text.strip(), v)], finished, v))
            for i, pool in pools.items():
                rounds[i].append([(row.tokens, steps[-1]) for row, steps, _, _ in pool])
                if strategy == "random":
                    rng.shuffle(pool)
                    kept = pool[:beam]
                else:
                    kept = sorted(pool, key=lambda c: -np.inf if c[3] is None else c[3], reverse=True)[:beam]
                beams[i] = [(row, steps, finished) for row, steps, finished, _ in kept]
                if on_step is not None and beams[i][0][1]:
                    on_step(i, beams[i][0][1][-1])
    results = []
    for i, kept in enumerate(beams):
        row, steps, _ = kept[0]
        results.append(SearchResult(text_of(row.tokens), steps, spent[i], strategy, scored[i], rounds=rounds[i]))
    return results


def search(model, tokenizer, prompt_ids: Sequence[int], *, on_step: Callable[[Step], None] | None = None,
           **options) -> SearchResult:
    """:func:`search_many` for one prompt; ``on_step(step)`` gets each kept step."""
    return search_many(model, tokenizer, [prompt_ids], on_step=None if on_step is None else (lambda i, s: on_step(s)),
                       **options)[0]
