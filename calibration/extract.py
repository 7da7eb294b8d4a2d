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

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from valueprobe.plugin.fingerprint import model_fingerprint, tokenizer_fingerprint
from valueprobe.plugin.hooks import capture, find_decoder_layers, with_position_ids
from valueprobe.plugin.models import eos_token_ids
from valueprobe.plugin.prompting import PromptFormat

from .data import Question, grade_numeric, grade_open

__all__ = ["FeatureSet", "extract_features"]

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
    """

    features: torch.Tensor
    rows: list[dict]

    @property
    def labels(self) -> np.ndarray:
        return np.array([r["label"] for r in self.rows], dtype=np.int64)

    def column(self, name: str) -> np.ndarray:
        return np.array([np.nan if r.get(name) is None else r[name] for r in self.rows], dtype=np.float64)

    def subset(self, index) -> FeatureSet:
        index = np.asarray(index)
        return FeatureSet(self.features[torch.as_tensor(index)], [self.rows[i] for i in index])

    @staticmethod
    def concat(sets: list[FeatureSet]) -> FeatureSet:
        return FeatureSet(torch.cat([s.features for s in sets]), [r for s in sets for r in s.rows])


def _cache_key(model, tokenizer, prompt_format: PromptFormat, max_new_tokens: int) -> str:
    fp = model_fingerprint(model, 1)
    blob = json.dumps(
        {"model": fp, "tok": tokenizer_fingerprint(tokenizer), "fmt": prompt_format.to_json(), "gen": max_new_tokens},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_shards(folder: Path) -> dict[str, tuple[torch.Tensor, dict]]:
    done: dict[str, tuple[torch.Tensor, dict]] = {}
    for meta_path in sorted(folder.glob("shard-*.json")):
        tensor_path = meta_path.with_suffix(".safetensors")
        if not tensor_path.exists():
            continue  # a shard whose tensors never landed: redo it
        rows = json.loads(meta_path.read_text())
        feats = load_file(str(tensor_path))["features"]
        for i, row in enumerate(rows):
            done[row["id"]] = (feats[i], row)
    return done


def _write_shard(folder: Path, index: int, feats: torch.Tensor, rows: list[dict]) -> None:
    base = folder / f"shard-{index:05d}"
    tmp = base.with_suffix(".safetensors.tmp")
    save_file({"features": feats.contiguous()}, str(tmp))
    os.replace(tmp, base.with_suffix(".safetensors"))
    # JSON last: a shard counts as done only when both files exist.
    base.with_suffix(".json.tmp").write_text(json.dumps(rows))
    os.replace(base.with_suffix(".json.tmp"), base.with_suffix(".json"))


def _entropy(p: torch.Tensor) -> float:
    p = p.clamp_min(1e-12)
    return float(-(p * p.log()).sum())


@torch.inference_mode()
def _run_choice_batch(model, tokenizer, fmt: PromptFormat, batch: list[Question], texts: list[str], layers, device):
    enc = fmt.tokenize(tokenizer, texts).to(device)
    with capture(model, layers) as cap:
        # Only the last position's logits are needed: skip the LM head elsewhere (a big matmul for large vocabs).
        out = model(**with_position_ids(enc), use_cache=False, logits_to_keep=1)
    feats = torch.stack([cap.batches[0][layer] for layer in layers], dim=1)
    logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()  # left padding: last column is real
    rows = []
    for i, q in enumerate(batch):
        letter_ids = fmt.letter_token_ids(tokenizer, len(q.choices))
        option_lp = logprobs[i, letter_ids]
        option_p = torch.softmax(option_lp, dim=-1)
        pred = int(option_lp.argmax())
        rows.append(
            {
                "prediction": fmt.letters[pred],
                "label": int(pred == q.answer),
                "max_softmax": float(option_p.max()),
                "option_entropy": _entropy(option_p),
                "answer_logprob": float(option_lp[pred]),
                "seq_logprob": None,
                "question_tokens": int(enc["attention_mask"][i].sum()),
            }
        )
    return feats, rows


@torch.inference_mode()
def _run_generate_batch(model, tokenizer, fmt: PromptFormat, batch: list[Question], texts: list[str], layers, device,
                        max_new_tokens):
    enc = fmt.tokenize(tokenizer, texts).to(device)
    with capture(model, layers) as cap:
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    feats = torch.stack([cap.batches[0][layer] for layer in layers], dim=1)
    new_tokens = gen.sequences[:, enc["input_ids"].shape[1] :]
    step_logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in gen.scores], dim=1).cpu()
    first_p = torch.softmax(gen.scores[0].float(), dim=-1).cpu()
    eos = eos_token_ids(model, tokenizer)
    rows = []
    for i, q in enumerate(batch):
        toks = new_tokens[i].tolist()
        length = next((j for j, t in enumerate(toks) if t in eos), len(toks))
        answer = tokenizer.decode(toks[:length], skip_special_tokens=True)
        chosen = step_logprobs[i, torch.arange(length), torch.as_tensor(toks[:length], dtype=torch.long)] if length else None
        correct = grade_numeric(answer, q.answer) if q.kind == "numeric" else grade_open(answer, q.answer)
        rows.append(
            {
                "prediction": answer,
                "label": int(correct),
                "max_softmax": float(first_p[i].max()),
                "option_entropy": _entropy(first_p[i]),
                "answer_logprob": float(step_logprobs[i, 0, toks[0]]) if toks else None,
                "seq_logprob": float(chosen.mean()) if chosen is not None else None,
                "question_tokens": int(enc["attention_mask"][i].sum()),
            }
        )
    return feats, rows


def extract_features(
    model,
    tokenizer,
    questions: list[Question],
    prompt_format: PromptFormat,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    shard_size: int = 64,
    progress: bool = True,
) -> FeatureSet:
    """Run the model over ``questions`` and return every layer's last-prompt-token state, labels and baselines.

    With ``cache_dir`` the work is saved in shards under ``cache_dir/<key>/`` (the key hashes the model and
    tokenizer fingerprints and the prompt format), and questions already there are not run again.
    """
    if not questions:
        raise ValueError("no questions to extract")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError("question ids must be unique")
    model.eval()
    device = next(model.parameters()).device
    layers = list(range(1, len(find_decoder_layers(model)) + 1))
    folder = None
    done: dict[str, tuple[torch.Tensor, dict]] = {}
    if cache_dir is not None:
        folder = Path(cache_dir) / _cache_key(model, tokenizer, prompt_format, max_new_tokens)
        folder.mkdir(parents=True, exist_ok=True)
        done = _load_shards(folder)
    todo = [q for q in questions if q.id not in done]
    # Render once; group by kind, then by rendered length, so batches pad little.
    rendered = {q.id: prompt_format.render(tokenizer, q.prompt()) for q in todo}
    todo.sort(key=lambda q: (q.kind != "choice", len(rendered[q.id])))
    next_shard = len(list(folder.glob("shard-*.json"))) if folder else 0
    pending_feats, pending_rows = [], []
    with tqdm(total=len(questions), initial=len(questions) - len(todo), desc="extract", disable=not progress,
              unit="q") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            by_kind = [q for q in batch if q.kind == "choice"], [q for q in batch if q.kind != "choice"]
            for kind_batch, runner in zip(by_kind, ("choice", "generate")):
                if not kind_batch:
                    continue
                texts = [rendered[q.id] for q in kind_batch]
                if runner == "choice":
                    feats, rows = _run_choice_batch(model, tokenizer, prompt_format, kind_batch, texts, layers, device)
                else:
                    feats, rows = _run_generate_batch(
                        model, tokenizer, prompt_format, kind_batch, texts, layers, device, max_new_tokens
                    )
                for q, row in zip(kind_batch, rows):
                    row.update({"id": q.id, "dataset": q.dataset, "kind": q.kind})
                pending_feats.append(feats)
                pending_rows.extend(rows)
                bar.update(len(kind_batch))
            if folder is not None and (len(pending_rows) >= shard_size or start + batch_size >= len(todo)):
                feats = torch.cat(pending_feats)
                _write_shard(folder, next_shard, feats, pending_rows)
                for i, row in enumerate(pending_rows):
                    done[row["id"]] = (feats[i], row)
                next_shard += 1
                pending_feats, pending_rows = [], []
    if folder is None:
        feats = torch.cat(pending_feats)
        for i, row in enumerate(pending_rows):
            done[row["id"]] = (feats[i], row)
    features = torch.stack([done[q.id][0] for q in questions])
    rows = [dict(done[q.id][1]) for q in questions]
    if not all(math.isfinite(float(v)) for v in features.reshape(-1)[:1000]):
        raise ValueError("non-finite features: check the model dtype")
    return FeatureSet(features, rows)
