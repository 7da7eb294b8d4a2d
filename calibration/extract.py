"""Feature extraction: one prefill per question, every layer at the last prompt token, plus labels and baselines.

The features come from the same hooks that serve (``valueprobe.plugin.hooks``), so fit-time and serve-time
values are the same numbers by construction. Labels come from the model itself on the same rendered prompt:

* multiple choice: the model's answer is the highest next-token logit among the option letters, read from the
  same forward pass that yields the features (no generation);
* open and numeric questions: greedy generation; the hooks record the prefill inside ``generate`` and the answer
  is graded by alias match or final number.

Baselines recorded per question: max-softmax over the option letters, entropy over the options, log-prob of the
chosen letter (all multiple choice); the first generated token's max-softmax and the post-generation mean token
log-prob of the answer (open); question length in tokens (all).

Results are written in shards (safetensors for the features, JSON for the rest) under a cache folder, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from valueprobe.plugin.fingerprint import model_fingerprint, tokenizer_fingerprint
from valueprobe.plugin.hooks import capture, find_decoder_layers, position_ids
from valueprobe.plugin.kvcache import cache_from_layers, cache_layers
from valueprobe.plugin.models import eos_token_ids
from valueprobe.plugin.nexttoken import next_token_features, summarize_logits
from valueprobe.plugin.prompting import PromptFormat, pad_token_id
from transformers import DynamicCache

from .data import Question, grade_numeric, grade_open

__all__ = ["FeatureSet", "SharedPrefix", "extract_answer_end", "extract_features", "save_labels", "load_labels"]

ROW_FIELDS = (
    "label",
    "max_softmax",
    "option_entropy",
    "answer_logprob",
    "question_tokens",
    "seq_logprob",
)


@dataclass
class FeatureSet:
    """Extracted features for ``n`` questions.

    ``features``: ``[n, n_layers, hidden]`` float32 (layer ``l`` at index ``l - 1``).
    ``rows``: per-question dicts with ``id``, ``dataset``, ``kind``, ``label`` (1 = model correct), the model's
    ``prediction`` and the baseline scores.
    ``pooled`` (answer-end sets only): more reads of the answer's tokens, each ``[n, n_layers, hidden]``:
    ``answer_mean`` (every layer's state averaged over the answer's tokens) and ``answer_min_token`` (the state
    at the answer token the model found least likely).
    """

    features: torch.Tensor
    rows: list[dict]
    pooled: dict[str, torch.Tensor] | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([r["label"] for r in self.rows], dtype=np.int64)

    def column(self, name: str) -> np.ndarray:
        return np.array([np.nan if r.get(name) is None else r[name] for r in self.rows], dtype=np.float64)

    def subset(self, index) -> FeatureSet:
        index = np.asarray(index)
        at = torch.as_tensor(index)
        pooled = None if self.pooled is None else {k: v[at] for k, v in self.pooled.items()}
        return FeatureSet(self.features[at], [self.rows[i] for i in index], pooled)

    def answer_read(self, read: str) -> torch.Tensor:
        """``[n, n_layers, hidden]`` as an ``answer_read`` artifact reads the answer: ``last`` (:attr:`features`,
        the state at its last token) or ``mean`` (its tokens averaged: ``pooled["answer_mean"]``)."""
        if read == "last":
            return self.features
        if read == "mean":
            if not self.pooled or "answer_mean" not in self.pooled:
                raise ValueError("answer_read 'mean' needs an answer-end extraction with pooled reads (`extract "
                                 "--answer-end` of this version)")
            return self.pooled["answer_mean"]
        raise ValueError(f"unknown answer read {read!r}; expected 'last' or 'mean'")


def _cache_key(model, tokenizer, prompt_format: PromptFormat, max_new_tokens: int) -> str:
    fp = model_fingerprint(model, 1)
    blob = json.dumps(
        {"model": fp, "tok": tokenizer_fingerprint(tokenizer, prompt_format), "fmt": prompt_format.to_json(), "gen": max_new_tokens},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


POOLS = ("answer_mean", "answer_min_token")


def _load_shards(folder: Path, *, pooled: bool = False) -> dict[str, tuple[torch.Tensor, dict, dict]]:
    """``id -> (features, row, pooled reads)``. With ``pooled`` a shard written without the pooled reads (by an
    older version) does not count as done, so a rerun reads its questions again."""
    done: dict[str, tuple[torch.Tensor, dict, dict]] = {}
    for meta_path in sorted(folder.glob("shard-*.json")):
        tensor_path = meta_path.with_suffix(".safetensors")
        if not tensor_path.exists():
            continue  # a shard whose tensors never landed: redo it
        rows = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
        if pooled and not all(k in tensors for k in POOLS):
            continue
        for i, row in enumerate(rows):
            done[row["id"]] = (tensors["features"][i], row, {k: tensors[k][i] for k in POOLS if k in tensors})
    return done


def _write_shard(folder: Path, index: int, feats: torch.Tensor, rows: list[dict],
                 pooled: dict[str, torch.Tensor] | None = None) -> None:
    base = folder / f"shard-{index:05d}"
    tmp = base.with_suffix(".safetensors.tmp")
    save_file({"features": feats.contiguous(), **{k: v.contiguous() for k, v in (pooled or {}).items()}}, str(tmp))
    os.replace(tmp, base.with_suffix(".safetensors"))
    # JSON last: a shard counts as done only when both files exist.
    base.with_suffix(".json.tmp").write_text(json.dumps(rows))
    os.replace(base.with_suffix(".json.tmp"), base.with_suffix(".json"))


class SharedPrefix:
    """KV cache of the token prefix every rendered prompt shares (the chat template's system part and the
    user-turn header), computed once and reused by every batch so that only each question's own tokens are
    prefilled. Rows whose tokens do not start with the prefix are run without it."""

    def __init__(self, model, tokenizer, fmt: PromptFormat, device):
        probes = ["Alpha?", "7 zebras", {"question": "Beta?", "choices": ["x", "y"]}, {"question": "9", "choices": ["1", "2"]}]
        token_lists = [tokenizer(fmt.render(tokenizer, p), add_special_tokens=fmt.adds_special_tokens(tokenizer))["input_ids"]
                       for p in probes]
        common = 0
        while all(len(t) > common + 1 for t in token_lists) and len({t[common] for t in token_lists}) == 1:
            common += 1
        self.ids: list[int] = token_lists[0][:common]
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if common >= 2:
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([self.ids], device=device), use_cache=True)
            self.layers = cache_layers(out.past_key_values)
        else:
            self.ids = []

    def __len__(self) -> int:
        return len(self.ids)

    def matches(self, ids: list[int]) -> bool:
        return bool(self.ids) and len(ids) > len(self.ids) and ids[: len(self.ids)] == self.ids

    def cache(self, batch: int) -> DynamicCache:
        """A fresh cache holding the prefix for ``batch`` rows (the forward appends to it, so never reuse one)."""
        return cache_from_layers([(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous())
                                  for k, v in self.layers])


def _batch_inputs(token_lists: list[list[int]], prefix_len: int, pad_id: int, device):
    """``[prefix][left padding][question tokens]`` per row: the shared prefix stays at positions 0..P-1, so one
    cache serves every row, and the last column is every row's last real token."""
    suffixes = [t[prefix_len:] for t in token_lists]
    width = max(len(x) for x in suffixes)
    n = len(token_lists)
    input_ids = torch.full((n, prefix_len + width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, prefix_len + width), dtype=torch.long)
    for i, (full, suffix) in enumerate(zip(token_lists, suffixes)):
        input_ids[i, :prefix_len] = torch.tensor(full[:prefix_len], dtype=torch.long)
        mask[i, :prefix_len] = 1
        input_ids[i, prefix_len + width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
        mask[i, prefix_len + width - len(suffix):] = 1
    return input_ids.to(device), mask.to(device)


# Plain temperature sampling, whatever the model's generation config says (Qwen's ships top-k/top-p and a
# repetition penalty): what semantic entropy and sampled reasoning traces assume.
PLAIN_SAMPLING = dict(do_sample=True, top_k=0, top_p=1.0, repetition_penalty=1.0)


def repeated_prompts(tokenizer, fmt: PromptFormat, questions: list[Question], n_samples: int,
                     prefix: SharedPrefix | None, pad_id: int, device) -> dict:
    """``generate`` inputs for ``n_samples`` rows per question (rendered with ``fmt``, left-padded behind the shared
    prefix whose KV cache they reuse when every row starts with it): ``input_ids``, ``attention_mask`` and
    ``past_key_values``."""
    special = fmt.adds_special_tokens(tokenizer)
    tokens = [tokenizer(fmt.render(tokenizer, q.prompt()), add_special_tokens=special)["input_ids"] for q in questions]
    rows = [t for t in tokens for _ in range(n_samples)]
    use = prefix if prefix is not None and all(prefix.matches(t) for t in rows) else None
    input_ids, mask = _batch_inputs(rows, len(use) if use is not None else 0, pad_id, device)
    return {"input_ids": input_ids, "attention_mask": mask,
            "past_key_values": use.cache(len(rows)) if use is not None else None}


@dataclass
class SamplingBatch:
    """One batch of :func:`sampling_batches`: its questions, the ``generate`` inputs (``n_samples`` rows per
    question), and the pad and end-of-answer token ids."""

    questions: list[Question]
    inputs: dict
    pad_id: int
    eos: list[int]


def sampling_batches(model, tokenizer, fmt: PromptFormat, total: int, todo: list[Question], *, n_samples: int,
                     rows_per_batch: int, seed_of, desc: str, unit: str = "q", progress: bool = True):
    """The batching every sampler shares (semantic-entropy answers, reasoning traces): ``todo`` in batches of
    ``rows_per_batch // n_samples`` questions, each rendered with ``fmt`` behind the shared prefix's KV cache and
    repeated ``n_samples`` times, the torch seed set to ``seed_of(questions, start)`` before the batch is yielded
    (so a resumed run draws the same samples), progress counted out of ``total`` questions."""
    model.eval()
    device = next(model.parameters()).device
    eos = sorted(eos_token_ids(model, tokenizer))
    pad_id = pad_token_id(tokenizer)
    prefix = SharedPrefix(model, tokenizer, fmt, device) if todo else None
    per_batch = max(1, rows_per_batch // n_samples)
    with tqdm(total=total, initial=total - len(todo), desc=desc, unit=unit, disable=not progress) as bar:
        for start in range(0, len(todo), per_batch):
            batch = todo[start : start + per_batch]
            inputs = repeated_prompts(tokenizer, fmt, batch, n_samples, prefix, pad_id, device)
            torch.manual_seed(seed_of(batch, start))
            yield SamplingBatch(batch, inputs, pad_id, eos)
            bar.update(len(batch))


@torch.inference_mode()
def _run_batch(model, tokenizer, fmt: PromptFormat, batch: list[Question], token_lists, layers, device, *,
               prefix: SharedPrefix | None, generate: bool, max_new_tokens: int, letter_ids: list[int]):
    """One batch: prefill (reading every layer at each row's last token and the next-token summary at the
    prompt's end) and, for unlabelled open questions, greedy generation stopped at the answer's end.
    Returns ``(features [n, L, H], summaries [n, 2+letters], generated token lists or None)``."""
    p_len = len(prefix) if prefix is not None else 0
    pad_id = pad_token_id(tokenizer)
    input_ids, mask = _batch_inputs(token_lists, p_len, pad_id, device)
    cache = prefix.cache(len(batch)) if p_len else None
    with capture(model, layers, prefill_cache_length=p_len) as cap:
        if generate:
            gen = model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache,
                                 max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=pad_id,
                                 eos_token_id=sorted(eos_token_ids(model, tokenizer)))
            first_logits = gen.logits[0]
            tokens = gen.sequences[:, input_ids.shape[1]:]
            step_lp = torch.stack([torch.log_softmax(x.float(), dim=-1).gather(1, tokens[:, j:j + 1])[:, 0]
                                   for j, x in enumerate(gen.logits)], dim=1)
            extra = list(zip(tokens.tolist(), step_lp.tolist()))
        else:
            positions = position_ids(mask)[:, p_len:]
            out = model(input_ids=input_ids[:, p_len:], attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
            first_logits = out.logits[:, -1]
            extra = None
    feats = torch.stack([cap.batches[0][layer] for layer in layers], dim=1)
    return feats, summarize_logits(first_logits, letter_ids), extra


@torch.inference_mode()
def _run_answer_batch(model, tokenizer, batch: list[Question], token_lists, answer_ids: dict[str, list[int]],
                      layers, device, *, prefix: SharedPrefix | None, letter_ids: list[int], eos: set[int]):
    """Both read positions of one batch in one pass, as serving computes them: the prompt's prefill (every layer
    at its last token and the next-token summary there), then the answer fed on its KV cache, as decoding does
    (every layer at the answer's last token: the state the decode step that emits the end of the answer
    computes). A multiple-choice answer is the letter the model picks here unless ``answer_ids`` has it; open
    answers come from ``answer_ids`` (right-padded in the continuation, so each row's last real token is its end).

    Returns ``(prompt features [n, L, H], answer features [n, L, H], summaries [n, 2+letters], answer token
    lists, answer statistics)``; see :func:`_answer_stats`."""
    p_len = len(prefix) if prefix is not None else 0
    pad_id = pad_token_id(tokenizer)
    input_ids, mask = _batch_inputs(token_lists, p_len, pad_id, device)
    cache = prefix.cache(len(batch)) if p_len else DynamicCache()
    with capture(model, layers, prefill_cache_length=p_len) as cap:
        positions = position_ids(mask)[:, p_len:]
        out = model(input_ids=input_ids[:, p_len:], attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
    prompt_feats = torch.stack([cap.batches[0][layer] for layer in layers], dim=1)
    first_logits = out.logits[:, -1]
    summaries = summarize_logits(first_logits, letter_ids)
    answers = []
    for i, q in enumerate(batch):
        if q.id in answer_ids:
            answers.append(answer_ids[q.id])
        elif q.kind == "choice":
            answers.append([letter_ids[next_token_features(summaries[i], "choice", len(q.choices))[2]]])
        else:
            raise ValueError(f"{q.id}: an open question needs its answer to read at")
    width = max(1, max(len(a) for a in answers))
    answer_input = torch.full((len(batch), width), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, a in enumerate(answers):
        answer_input[i, :len(a)] = torch.tensor(a, dtype=torch.long)
        answer_mask[i, :len(a)] = 1
    full_mask = torch.cat([mask, answer_mask.to(device)], dim=1)
    positions = position_ids(full_mask)[:, mask.shape[1]:]
    with capture(model, layers, prefill_cache_length=mask.shape[1]) as cap, _every_position(model, layers) as states:
        cont = model(input_ids=answer_input.to(device), attention_mask=full_mask, position_ids=positions,
                     past_key_values=out.past_key_values, use_cache=True)
    answer_feats = torch.stack([cap.batches[0][layer] for layer in layers], dim=1)
    stats = [_answer_stats(torch.cat([first_logits[i:i + 1], cont.logits[i, :len(a)]]),
                           torch.tensor(a, dtype=torch.long, device=device), eos)
             for i, a in enumerate(answers)]
    pooled = _pool_answer_states(torch.stack([states[layer] for layer in layers], dim=2), answer_mask, stats,
                                 prompt_feats)
    return prompt_feats, answer_feats, summaries, answers, stats, pooled


@contextlib.contextmanager
def _every_position(model, layers):
    """``{layer: [batch, seq, hidden]}``: every position's output of the given decoder layers (1-based) in the
    forward pass run inside; the same tensors the last-token reader takes its one position from."""
    states: dict[int, torch.Tensor] = {}
    decoder = find_decoder_layers(model)

    def reader(layer: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            states[layer] = hidden.detach().float().cpu()
        return hook

    handles = [decoder.block(layer).register_forward_hook(reader(layer)) for layer in layers]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def _pool_answer_states(states: torch.Tensor, answer_mask: torch.Tensor, stats: list[dict],
                        prompt_feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """The answer's tokens pooled, per layer: ``states`` ``[n, width, L, H]`` from feeding the answer on the
    prompt's cache. ``answer_mean`` averages a row's real answer positions (the running mean a decoding hook keeps);
    ``answer_min_token`` is the state at the position that read the answer's least likely token (``stats`` gives
    each token's log-probability). An empty answer has no positions: both are its prompt's last-token state."""
    n = states.shape[0]
    mean = torch.empty_like(prompt_feats)
    low = torch.empty_like(prompt_feats)
    for i in range(n):
        length = int(answer_mask[i].sum())
        if length == 0:
            mean[i] = low[i] = prompt_feats[i]
            continue
        mean[i] = states[i, :length].mean(dim=0)
        low[i] = states[i, int(np.argmin(stats[i]["token_logprobs"]))]
    return {"answer_mean": mean, "answer_min_token": low}


def _answer_stats(logits: torch.Tensor, answer: torch.Tensor, eos: set[int]) -> dict:
    """Free answer-side signals of one row from the prefill of prompt + answer: ``logits`` ``[a + 1, vocab]``
    (the positions that predict each answer token, then the one after the answer), ``answer`` ``[a]`` token ids.
    Mean, minimum and sum of the answer's token log-probabilities, its length, and the probability that the
    answer ends there (any end-of-answer token next)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[:-1].gather(1, answer.view(-1, 1))[:, 0] if answer.numel() else logp[:0, 0]
    end = torch.logsumexp(logp[-1, sorted(eos)], dim=0) if eos else torch.tensor(float("nan"))
    return {"token_logprobs": [float(x) for x in chosen],
            "answer_mean_logprob": float(chosen.mean()) if chosen.numel() else None,
            "answer_min_logprob": float(chosen.min()) if chosen.numel() else None,
            "answer_sum_logprob": float(chosen.sum()),
            "answer_tokens": int(answer.numel()),
            "answer_end_prob": float(end.exp())}


def _row(fmt: PromptFormat, q: Question, summary: torch.Tensor, n_tokens: int, generated, tokenizer, eos,
         label: dict | None) -> dict:
    """Label and baselines of one question from its next-token summary (and generated tokens or a stored label)."""
    if isinstance(generated, dict):  # read at the answer's end: answer-side statistics of the same pass
        row = _row(fmt, q, summary, n_tokens, None, tokenizer, eos, label)
        row.update(generated)
        return row
    if q.kind == "choice":
        max_softmax, entropy, pred = next_token_features(summary, "choice", len(q.choices))
        return {"prediction": fmt.letters[pred], "label": int(pred == q.answer), "max_softmax": max_softmax,
                "option_entropy": entropy, "answer_logprob": float(summary[2 + pred]), "seq_logprob": None,
                "question_tokens": n_tokens}
    max_softmax, entropy, _ = next_token_features(summary, "open")
    row = {"max_softmax": max_softmax, "option_entropy": entropy, "question_tokens": n_tokens}
    if label is not None:  # answer generated by an earlier run and kept in the labels file
        row.update({k: label.get(k) for k in ("prediction", "label", "seq_logprob", "answer_logprob")})
        return row
    answer_tokens, token_logprobs = generated
    length = next((j for j, t in enumerate(answer_tokens) if t in eos), len(answer_tokens))
    answer = tokenizer.decode(answer_tokens[:length], skip_special_tokens=True)
    chosen = [float(x) for x in token_logprobs[:length]]
    correct = grade_numeric(answer, q.answer) if q.kind == "numeric" else grade_open(answer, q.answer)
    row.update({"prediction": answer, "label": int(correct),
                "seq_logprob": float(np.mean(chosen)) if chosen else None,
                "answer_logprob": chosen[0] if chosen else None})
    return row


def extract_features(
    model,
    tokenizer,
    questions: list[Question],
    prompt_format: PromptFormat,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    generate_batch_size: int = 16,
    max_new_tokens: int = 16,
    shard_size: int = 64,
    labels: dict[str, dict] | None = None,
    reuse_prefix: bool = True,
    wave_size: int | None = None,
    answers: dict[str, str] | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Run the model over ``questions`` and return every layer's last-prompt-token state, labels and baselines.

    With ``cache_dir`` the work is saved in shards under ``cache_dir/<key>/`` (the key hashes the model and
    tokenizer fingerprints and the prompt format), and questions already there are not run again.

    Speed: the KV cache of the prefix every rendered prompt shares is computed once (``reuse_prefix``);
    questions are taken in waves of ``wave_size`` (in the given order, so an interrupted run has a bit of every
    source) and sorted by kind and token length inside a wave; open questions are generated
    ``generate_batch_size`` at a time and stop when every row has reached an end-of-answer token. ``labels``
    (``id -> row`` from :func:`load_labels`) supplies answers generated by an earlier run: those open questions
    get a prefill only. Each row records ``seconds`` (its share of its batch's wall time) and ``generated``.

    ``answers`` (``id -> the model's answer``: the generated text for open questions, e.g. from a labels file;
    optionally the letter for multiple choice, which is otherwise the one the model picks in the same pass) also
    reads at ``answer_end``: the prompt's prefill, then the answer fed on its KV cache as decoding does (no
    generation), every layer read at the answer's last token (the state the decode step that emits the end of the
    answer computes). The result is the answer-end set; its rows also carry ``answer`` and the answer-side signals
    of the same pass (``answer_mean_logprob``, ``answer_min_logprob``, ``answer_sum_logprob``, ``answer_tokens``,
    ``answer_end_prob``); ``max_softmax`` and ``option_entropy`` stay those at the prompt's end. The prompt-end
    states of the same pass go to the prompt-only cache, so :func:`extract_answer_end` costs one pass. Every open
    question needs an answer and its grade in ``labels``.
    """
    if not questions:
        raise ValueError("no questions to extract")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError("question ids must be unique")
    labels = labels or {}
    model.eval()
    device = next(model.parameters()).device
    layers = list(range(1, len(find_decoder_layers(model)) + 1))
    folder = prompt_folder = None
    done: dict[str, tuple[torch.Tensor, dict, dict]] = {}
    prompt_done: dict[str, tuple[torch.Tensor, dict, dict]] = {}
    if answers is not None:
        missing = [q.id for q in questions if q.kind != "choice" and (q.id not in answers or q.id not in labels)]
        if missing:
            raise ValueError(f"{len(missing)} open questions have no answer (and grade) to read at: {missing[:5]}")
    if cache_dir is not None:
        key = _cache_key(model, tokenizer, prompt_format, max_new_tokens)
        prompt_folder = Path(cache_dir) / key
        folder = prompt_folder if answers is None else Path(cache_dir) / f"{key}-answer_end"
        folder.mkdir(parents=True, exist_ok=True)
        done = _load_shards(folder, pooled=answers is not None)
        if answers is not None:
            prompt_folder.mkdir(parents=True, exist_ok=True)
            prompt_done = _load_shards(prompt_folder)
    if answers is not None:  # an answer that changed since it was read is read again
        done = {i: v for i, v in done.items() if i not in answers or v[1].get("answer") == answers[i]}
    todo = [q for q in questions if q.id not in done]
    with contextlib.ExitStack() as locks:
        for f in {folder, prompt_folder} if todo else ():
            if f is not None:
                locks.enter_context(_writer_lock(f))
        return _extract_todo(model, tokenizer, questions, prompt_format, todo, done, prompt_done, folder,
                             prompt_folder, labels, answers, layers, device, batch_size, generate_batch_size,
                             max_new_tokens, shard_size, reuse_prefix, wave_size, progress)


@contextlib.contextmanager
def _writer_lock(folder: Path):
    """One writer per cache folder: two extractions writing shards into one folder would number them alike and
    overwrite each other's (a fit started beside a running extraction did). A second writer is refused."""
    with open(folder / ".writer.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another extraction is writing to {folder}; wait for it to finish (this run would "
                             "compute questions it has not cached yet)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _extract_todo(model, tokenizer, questions, prompt_format, todo, done, prompt_done, folder, prompt_folder, labels,
                  answers, layers, device, batch_size, generate_batch_size, max_new_tokens, shard_size, reuse_prefix,
                  wave_size, progress) -> FeatureSet:
    eos = eos_token_ids(model, tokenizer)
    letter_ids = prompt_format.letter_token_ids(tokenizer, len(prompt_format.letters))
    prefix = SharedPrefix(model, tokenizer, prompt_format, device) if (reuse_prefix and todo) else None
    special = prompt_format.adds_special_tokens(tokenizer)
    tokens = {q.id: tokenizer(prompt_format.render(tokenizer, q.prompt()), add_special_tokens=special)["input_ids"]
              for q in todo}
    answer_ids: dict[str, list[int]] = {}
    for q in todo if answers is not None else []:
        if q.id not in answers:
            continue  # multiple choice: the letter the model picks in the same pass
        if q.kind == "choice":  # the letter token the model emits, as the prompt-only readout picks it
            answer_ids[q.id] = [letter_ids[prompt_format.letters.index(answers[q.id])]]
        else:
            answer_ids[q.id] = tokenizer(answers[q.id], add_special_tokens=False)["input_ids"]

    def needs_generation(q: Question) -> bool:
        return answers is None and q.kind != "choice" and q.id not in labels

    def length(q: Question) -> int:
        return len(tokens[q.id]) + len(answer_ids.get(q.id, ()))

    # Waves keep the given (interleaved) order; inside one, similar lengths share a batch so padding is small.
    wave = wave_size or max(len(todo), 1)
    groups: list[tuple[bool, list[Question]]] = []
    for w in range(0, len(todo), wave):
        chunk = todo[w : w + wave]
        for gen_flag in (False, True):
            part = sorted((q for q in chunk if needs_generation(q) == gen_flag), key=length)
            size = generate_batch_size if gen_flag else batch_size
            groups.extend((gen_flag, part[i : i + size]) for i in range(0, len(part), size))

    shards = {f: len(list(f.glob("shard-*.json"))) for f in {folder, prompt_folder} if f is not None}

    def flush(target: Path | None, feats: list, rows: list, into: dict, pools: list | None = None) -> None:
        if not rows:
            return
        feats_all = torch.cat(feats)
        pooled = {k: torch.cat([p[k] for p in pools]) for k in POOLS} if pools else None
        if target is not None:
            _write_shard(target, shards[target], feats_all, rows, pooled)
            shards[target] += 1
        for i, row in enumerate(rows):
            into[row["id"]] = (feats_all[i], row, {k: v[i] for k, v in (pooled or {}).items()})
        feats.clear()
        rows.clear()
        if pools is not None:
            pools.clear()

    pending_feats, pending_rows, pending_pools = [], [], []
    prompt_feats_pending, prompt_rows_pending = [], []
    with tqdm(total=len(questions), initial=len(questions) - len(todo), desc="extract", disable=not progress,
              unit="q") as bar:
        for number, (gen_flag, batch) in enumerate(groups):
            token_lists = [tokens[q.id] for q in batch]
            use_prefix = prefix if prefix is not None and all(prefix.matches(t) for t in token_lists) else None
            started = time.perf_counter()
            if answers is None:
                feats, summaries, generated = _run_batch(
                    model, tokenizer, prompt_format, batch, token_lists, layers, device, prefix=use_prefix,
                    generate=gen_flag, max_new_tokens=max_new_tokens, letter_ids=letter_ids)
            else:
                prompt_feats, feats, summaries, read, stats, pools = _run_answer_batch(
                    model, tokenizer, batch, token_lists, answer_ids, layers, device, prefix=use_prefix,
                    letter_ids=letter_ids, eos=eos)
            seconds = (time.perf_counter() - started) / len(batch)
            for i, q in enumerate(batch):
                common = {"id": q.id, "dataset": q.dataset, "kind": q.kind, "seconds": round(seconds, 4),
                          "generated": gen_flag, "prefix_cached": use_prefix is not None}
                if answers is None:
                    row = _row(prompt_format, q, summaries[i], len(token_lists[i]),
                               generated[i] if generated else None, tokenizer, eos, labels.get(q.id))
                    pending_rows.append({**row, **common})
                    continue
                prompt_row = {**_row(prompt_format, q, summaries[i], len(token_lists[i]), None, tokenizer, eos,
                                     labels.get(q.id)), **common}
                answer = answers.get(q.id, prompt_row["prediction"])
                if q.kind == "choice" and prompt_row["prediction"] != answer:
                    raise ValueError(f"{q.id}: the answer to read at is {answer!r} but the model chose "
                                     f"{prompt_row['prediction']!r} on this prompt: answers from another model or format?")
                pending_rows.append({**prompt_row, **stats[i], "answer": answer})
                if i == 0:
                    pending_pools.append(pools)
                if q.id not in prompt_done:
                    prompt_feats_pending.append(prompt_feats[i:i + 1])
                    prompt_rows_pending.append(prompt_row)
            pending_feats.append(feats)
            bar.update(len(batch))
            last = number == len(groups) - 1
            if len(pending_rows) >= shard_size or last:
                flush(folder, pending_feats, pending_rows, done, pending_pools if answers is not None else None)
                if answers is not None:
                    flush(prompt_folder, prompt_feats_pending, prompt_rows_pending, prompt_done)
    features = torch.stack([done[q.id][0] for q in questions])
    # the number of options a multiple-choice question shows (its chance level; a stack column at the answer's end)
    rows = [dict(done[q.id][1], n_options=len(q.choices) if q.choices else 0) for q in questions]
    if not all(math.isfinite(float(v)) for v in features.reshape(-1)[:1000]):
        raise ValueError("non-finite features: check the model dtype")
    pooled = {k: torch.stack([done[q.id][2][k] for q in questions]) for k in POOLS} if answers is not None else None
    return FeatureSet(features, rows, pooled)


def extract_answer_end(model, tokenizer, questions: list[Question], prompt_format: PromptFormat, *,
                       labels: dict[str, dict], **kwargs) -> tuple[FeatureSet, FeatureSet]:
    """Both read positions for ``questions``: ``(at the prompt's end, at the answer's end)``, from one pass
    (see ``answers`` in :func:`extract_features`): multiple-choice answers are the letters the model picks, open
    answers the generated ones in ``labels`` (a labels file), so nothing is generated here. Both sets are cached
    under ``cache_dir``; ``kwargs`` go to :func:`extract_features`."""
    missing = [q.id for q in questions if q.kind != "choice" and q.id not in labels]
    if missing:
        raise ValueError(f"{len(missing)} open questions have no generated answer in the labels file (generate "
                         f"them with `valueprobe extract --labels FILE` first): {missing[:5]}")
    answers = {q.id: labels[q.id]["prediction"] for q in questions if q.kind != "choice"}
    answer = extract_features(model, tokenizer, questions, prompt_format, labels=labels, answers=answers, **kwargs)
    # With a cache the same pass filled the prompt-only one and this reads it back; without, it is a second pass.
    prompt = extract_features(model, tokenizer, questions, prompt_format, labels=labels, **kwargs)
    return prompt, answer


LABEL_FIELDS = ("id", "dataset", "kind", "prediction", "label", "seq_logprob", "answer_logprob")


def save_labels(rows: list[dict], path: str | os.PathLike, *, model_name: str, max_new_tokens: int) -> int:
    """Write the model's generated answers and their grades (open and numeric questions) as JSONL.

    Generation is the expensive part of extraction; with this file a later run only repeats the prefill.
    Returns the number of lines written. Rows are sorted by id so the file diffs cleanly."""
    out = sorted((r for r in rows if r.get("kind") != "choice" and r.get("generated", True)), key=lambda r: r["id"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in out:
            fh.write(json.dumps({**{k: r.get(k) for k in LABEL_FIELDS}, "model_name": model_name,
                                 "max_new_tokens": max_new_tokens}, ensure_ascii=False) + "\n")
    return len(out)


def load_labels(path: str | os.PathLike, *, model_name: str | None = None) -> dict[str, dict]:
    """Read a labels file written by :func:`save_labels`: ``id -> row``. Rows of another model are skipped."""
    labels = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                if model_name is None or rec.get("model_name") == model_name:
                    labels[rec["id"]] = rec
    return labels
