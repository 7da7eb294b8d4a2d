"""Semantic entropy: the costly sampling baseline that a prompt-only confidence is measured against.

Kuhn et al. (2023) / Farquhar et al. (2024): sample several answers at temperature 1, group them into meaning
clusters, and take the entropy over clusters; a model that gives the same answer in different words is
confident, one that gives different answers is not. It costs one generation per sample (5x the answer), against
nothing extra for the probe that reads the prefill.

Clustering here is by answer equivalence, not by an NLI model (no entailment model installs offline on these
machines): two short answers mean the same when their SQuAD-normalised forms are equal or one appears in the
other as whole words, the rule the open-question grader itself uses ("Homer" ~ "Homer, the poet"). For the
short-form answers of TriviaQA and NQ-open this is what bidirectional entailment mostly decides; longer
free-text answers would need the NLI model.

Samples are kept as a JSONL data file (one line per question, appended as each batch finishes, so a run resumes),
because generation is the expensive part on CPU; scoring re-reads the file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from valueprobe.plugin.prompting import PromptFormat

from .data import Question, normalize_answer
from .extract import PLAIN_SAMPLING, sampling_batches

__all__ = ["equivalent", "cluster_answers", "semantic_entropy", "sample_answers", "load_samples"]


def equivalent(a: str, b: str) -> bool:
    """Same meaning for short answers: equal normalised forms, or one inside the other as whole words."""
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return na == nb
    return na == nb or f" {na} " in f" {nb} " or f" {nb} " in f" {na} "


def cluster_answers(answers: list[str]) -> list[int]:
    """Cluster id per answer; an answer joins the first cluster whose first member it is equivalent to."""
    heads: list[str] = []
    ids = []
    for answer in answers:
        for c, head in enumerate(heads):
            if equivalent(answer, head):
                ids.append(c)
                break
        else:
            heads.append(answer)
            ids.append(len(heads) - 1)
    return ids


def semantic_entropy(answers: list[str], logprobs: list[float] | None = None) -> float:
    """Entropy (nats) over meaning clusters. Without ``logprobs``: cluster shares by count (discrete semantic
    entropy, Farquhar et al. 2024). With ``logprobs`` (each sample's summed token log-probability): cluster mass
    is the sum of the samples' normalised probabilities (Kuhn et al. 2023)."""
    if not answers:
        raise ValueError("no answers")
    ids = np.asarray(cluster_answers(answers))
    if logprobs is None:
        weights = np.ones(len(answers))
    else:
        lp = np.asarray(logprobs, dtype=np.float64)
        weights = np.exp(lp - lp.max())
    mass = np.bincount(ids, weights=weights)
    p = mass / mass.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def load_samples(path: str | os.PathLike) -> dict[str, dict]:
    """``id -> record`` from a samples file (later lines win)."""
    out = {}
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["id"]] = rec
    return out


@torch.inference_mode()
def sample_answers(model, tokenizer, questions: list[Question], fmt: PromptFormat, out: str | os.PathLike, *,
                   model_name: str, n_samples: int = 5, temperature: float = 1.0, max_new_tokens: int = 16,
                   rows_per_batch: int = 16, seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """Sample ``n_samples`` answers per question (plain temperature sampling: no top-k/top-p, no repetition
    penalty, whatever the model's generation config says) and append one JSON line per question to ``out``.
    Questions already in ``out`` are skipped. Each line records the answers, each one's summed token log-prob,
    token counts and the question's share of the batch wall time. Returns the whole file as ``id -> record``."""
    if n_samples < 2:
        raise ValueError("semantic entropy needs at least 2 samples")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = load_samples(out)
    todo = [q for q in questions if q.id not in done]

    def seed_of(batch, start):
        # From the run seed and the batch's first question only: results are appended a whole batch at a time, so a
        # resumed run's batches start at the same questions and draw the same samples. (The batch's offset in the
        # to-do list, part of this seed before, shrinks on resume and changed every later draw.)
        return seed * 1_000_003 + sum(map(ord, batch[0].id)) * 7919

    with out.open("a") as fh:
        for b in sampling_batches(model, tokenizer, fmt, len(questions), todo, n_samples=n_samples,
                                  rows_per_batch=rows_per_batch, seed_of=seed_of, desc="sample", progress=progress):
            batch, inputs, pad_id, eos = b.questions, b.inputs, b.pad_id, b.eos
            started = time.perf_counter()
            gen = model.generate(**inputs, **PLAIN_SAMPLING, max_new_tokens=max_new_tokens, temperature=temperature,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=pad_id,
                                 eos_token_id=eos)
            seconds = (time.perf_counter() - started) / len(batch)
            new = gen.sequences[:, inputs["input_ids"].shape[1]:]
            lp = torch.stack([torch.log_softmax(x.float() / temperature, dim=-1).gather(1, new[:, j:j + 1])[:, 0]
                              for j, x in enumerate(gen.logits)], dim=1)
            for i, q in enumerate(batch):
                answers, logprobs, lengths = [], [], []
                for r in range(i * n_samples, (i + 1) * n_samples):
                    toks = new[r].tolist()
                    length = next((j for j, t in enumerate(toks) if t in eos), len(toks))
                    answers.append(tokenizer.decode(toks[:length], skip_special_tokens=True).strip())
                    logprobs.append(float(lp[r, :length].sum()) if length else 0.0)
                    lengths.append(min(length + 1, len(toks)))  # the end token is generated too
                rec = {"id": q.id, "dataset": q.dataset, "answers": answers, "logprobs": logprobs,
                       "tokens": lengths, "seconds": round(seconds, 3), "model_name": model_name,
                       "temperature": temperature, "max_new_tokens": max_new_tokens}
                fh.write(json.dumps(rec) + "\n")
                done[q.id] = rec
            fh.flush()
    return done


def score_rows(samples: dict[str, dict], ids: list[str]) -> dict[str, np.ndarray]:
    """Confidence arrays (higher = more confident) for ``ids``: negative discrete and likelihood-weighted
    semantic entropy, and the share of the largest cluster."""
    discrete, weighted, top = [], [], []
    for i in ids:
        rec = samples[i]
        discrete.append(-semantic_entropy(rec["answers"]))
        weighted.append(-semantic_entropy(rec["answers"], rec["logprobs"]))
        counts = np.bincount(cluster_answers(rec["answers"]))
        top.append(counts.max() / counts.sum())
    return {"semantic entropy (discrete)": np.asarray(discrete), "semantic entropy (likelihood-weighted)":
            np.asarray(weighted), "largest cluster share": np.asarray(top)}
