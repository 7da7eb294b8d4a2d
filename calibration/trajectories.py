"""Reasoning trajectories: sampled step-by-step solutions, their step boundaries and the states there.

A trace is the model's own answer to a multi-step problem (GSM8K), sampled at temperature > 0 so that one
problem gets right and wrong traces. Steps are the non-empty lines of the answer. States: ``s_0`` is the last
prompt token; ``s_t`` is the token that ends step ``t`` (the one carrying its newline, or the last token before
the end-of-answer token for the final line). The terminal reward is whether the final answer is right.

Generation is the expensive part on CPU, so traces (text, generated token ids, steps, boundaries, answer,
grade) are appended to a JSONL data file as each batch finishes (a rerun resumes) and kept in the repo. The
hidden states at the boundaries are recorded during generation by :class:`~valueprobe.plugin.hooks.StepStateRecorder`
(no extra pass) into a cache folder; a later run without that cache re-reads them with one prefill per trace
(:func:`trace_states`), at the same token positions.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from valueprobe.plugin.search import final_answer  # the one grader: traces, benchmarks and served search
from tqdm.auto import tqdm

from valueprobe.plugin.hooks import StepStateRecorder, find_decoder_layers
from valueprobe.plugin.prompting import PromptFormat

from .data import Question, grade_numeric
from .extract import PLAIN_SAMPLING, sampling_batches

__all__ = ["limit_heap_fragmentation", "recorded_states", "TRACE_FORMAT", "split_steps", "step_boundaries", "final_answer", "generate_traces", "load_traces",
           "trace_states", "TraceSet"]

TRACE_FORMAT = PromptFormat(open_template="{question}\n\nSolve this step by step, one short step per line. "
                                          "Finish with a line of the form 'Answer: <number>'.")


def split_steps(text: str) -> list[tuple[str, int]]:
    """Non-empty lines of ``text`` with the character offset where each ends (its newline, or the text's end)."""
    out, start = [], 0
    for line in text.split("\n"):
        end = start + len(line)
        if line.strip():
            out.append((line.strip(), end))
        start = end + 1
    return out


def step_boundaries(tokenizer, token_ids: list[int]) -> tuple[list[str], list[int]]:
    """Steps of a generated answer and, per step, the index of the generated token that ends it: the first token
    whose decoded prefix reaches past the step's last character (so it carries the newline, or is the answer's
    last token). Token ids must exclude the end-of-answer token."""
    if not token_ids:
        return [], []
    lengths = [len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)) for i in range(len(token_ids))]
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    steps, ends = [], []
    for line, end in split_steps(text):
        # the token that makes the text longer than `end` carries the newline; the last line ends at the text end
        idx = next((i for i, n in enumerate(lengths) if n > end), len(lengths) - 1)
        if ends and idx <= ends[-1]:
            steps[-1] = steps[-1] + "\n" + line  # two lines inside one token: one step
            continue
        steps.append(line)
        ends.append(idx)
    return steps, ends


def load_traces(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _states_file(folder: Path, batch_key: str) -> Path:
    return folder / f"states-{batch_key}.safetensors"


@torch.inference_mode()
def generate_traces(model, tokenizer, problems: list[Question], out: str | os.PathLike, *, model_name: str,
                    fmt: PromptFormat = TRACE_FORMAT, n_samples: int = 4, temperature: float = 0.8,
                    max_new_tokens: int = 320, rows_per_batch: int = 16, layers=None,
                    states_dir: str | os.PathLike | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Sample ``n_samples`` reasoning traces per problem and append them to ``out`` (JSONL), skipping problems
    already there. With ``states_dir``, the states at ``s_0`` and every step boundary of ``layers`` (default:
    every layer) are recorded during generation and saved per batch (float16). Returns every trace in ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {t["problem"] for t in load_traces(out)}
    todo = [q for q in problems if q.id not in done]
    n_layers = len(find_decoder_layers(model))
    layers = sorted(set(layers or range(1, n_layers + 1)))
    folder = Path(states_dir) if states_dir else None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)

    def seed_of(batch, start):  # from the run seed and the batch's first problem: a resumed run draws the same
        return seed * 1_000_003 + int(re.sub(r"\D", "", batch[0].id) or 0)

    with out.open("a") as fh:
        for b in sampling_batches(model, tokenizer, fmt, len(problems), todo, n_samples=n_samples,
                                  rows_per_batch=rows_per_batch, seed_of=seed_of, desc="traces", unit="problem",
                                  progress=progress):
            batch, inputs, pad_id, eos = b.questions, b.inputs, b.pad_id, b.eos
            started = time.perf_counter()
            with StepStateRecorder(model, layers) as rec:
                seq = model.generate(**inputs, **PLAIN_SAMPLING, max_new_tokens=max_new_tokens,
                                     temperature=temperature, pad_token_id=pad_id, eos_token_id=eos)
            seconds = (time.perf_counter() - started) / (len(batch) * n_samples)
            states = rec.states()  # {layer: [rows, forwards, H]}
            n_forwards = next(iter(states.values())).shape[1]
            new = seq[:, inputs["input_ids"].shape[1]:].tolist()
            saved: dict[str, torch.Tensor] = {}
            records = []
            for r, tokens in enumerate(new):
                q = batch[r // n_samples]
                length = next((j for j, t in enumerate(tokens) if t in eos), None)
                truncated = length is None
                answer_ids = tokens[: length if length is not None else len(tokens)]
                steps, ends = step_boundaries(tokenizer, answer_ids)
                # state after generated token g is column g + 1 (column 0: the last prompt token)
                keep = [i for i, g in enumerate(ends) if g + 1 < n_forwards]
                steps, ends = [steps[i] for i in keep], [ends[i] for i in keep]
                text = tokenizer.decode(answer_ids, skip_special_tokens=True)
                pred = final_answer(text)
                trace_id = f"{q.id}#{r % n_samples}"
                records.append({"id": trace_id, "problem": q.id, "dataset": q.dataset, "sample": r % n_samples,
                                "gold": str(q.answer), "prediction": pred,
                                "label": int(bool(pred) and grade_numeric(pred, str(q.answer))),
                                "truncated": truncated, "steps": steps, "step_ends": ends, "tokens": answer_ids,
                                "seconds": round(seconds, 3), "temperature": temperature, "model_name": model_name})
                if folder is not None:
                    cols = torch.tensor([0] + [g + 1 for g in ends])
                    saved[trace_id] = torch.stack([states[layer][r, cols] for layer in layers], dim=1).contiguous()
            if folder is not None:
                key = re.sub(r"[^A-Za-z0-9_-]", "_", batch[0].id)
                save_file(saved, str(_states_file(folder, key)), metadata={"layers": json.dumps(layers)})
            for record in records:
                fh.write(json.dumps(record) + "\n")
            fh.flush()
    return load_traces(out)


@dataclass
class TraceSet:
    """States along traces: ``states[i]`` is ``[n_states, n_layers, H]`` for ``traces[i]`` (``s_0 .. s_T``)."""

    traces: list[dict]
    states: list[torch.Tensor]
    layers: list[int]

    def layer(self, layer: int) -> list[np.ndarray]:
        j = self.layers.index(layer)
        return [s[:, j, :].float().numpy() for s in self.states]


@torch.inference_mode()
def trace_states(model, tokenizer, traces: list[dict], *, fmt: PromptFormat = TRACE_FORMAT, layers=None,
                 states_dir: str | os.PathLike | None = None, problems: dict[str, Question] | None = None,
                 progress: bool = True) -> TraceSet:
    """States at ``s_0`` and each step end of every trace: read from the states saved during generation when
    ``states_dir`` has them, else by one prefill of prompt + generated tokens per trace (``problems`` maps a
    problem id to its question, needed to render the prompt)."""
    saved: dict[str, torch.Tensor] = {}
    saved_layers = None
    if states_dir and Path(states_dir).exists():
        for f in sorted(Path(states_dir).glob("states-*.safetensors")):
            from safetensors import safe_open

            with safe_open(str(f), "pt") as sf:
                saved_layers = json.loads(sf.metadata()["layers"])
            saved.update(load_file(str(f)))
    n_layers = len(find_decoder_layers(model)) if model is not None else None
    layers = sorted(set(layers or saved_layers or range(1, (n_layers or 0) + 1)))
    out = []
    missing = [t for t in traces if t["id"] not in saved or not set(layers) <= set(saved_layers or [])]
    if missing and (model is None or problems is None):
        raise ValueError(f"{len(missing)} traces have no saved states and no model/problems were given to prefill")
    special = fmt.adds_special_tokens(tokenizer) if missing else False
    device = next(model.parameters()).device if missing else None
    made: dict[str, torch.Tensor] = {}
    for t in tqdm(missing, desc="trace states", unit="trace", disable=not progress or not missing):
        prompt = tokenizer(fmt.render(tokenizer, problems[t["problem"]].prompt()),
                           add_special_tokens=special)["input_ids"]
        ids = torch.tensor([prompt + t["tokens"]], device=device)
        # the same recorder as during generation, keeping every position: column i is token i
        with StepStateRecorder(model, layers, all_positions=True) as rec:
            model(input_ids=ids)
        hs = rec.states()
        cols = torch.tensor([len(prompt) - 1] + [len(prompt) + g for g in t["step_ends"]])
        made[t["id"]] = torch.stack([hs[layer][0, cols] for layer in layers], dim=1)
    for t in traces:
        if t["id"] in made:
            out.append(made[t["id"]])
        else:
            idx = [saved_layers.index(layer) for layer in layers]
            out.append(saved[t["id"]][:, idx])
    return TraceSet(traces, out, layers)


def limit_heap_fragmentation(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes or more by mmap, so that freed ones go back to the OS at once.
    Decoding grows every layer's KV cache by re-allocating it each step; under glibc's adaptive threshold those
    blocks land on the heap and fragment it (`traces`, one batch of 16 rows x 256 new tokens of the 1.5B model:
    past 23.5 GB RSS on a 24 GB machine before it was stopped, and a 7.3 GB peak with this). It costs time
    (every large block is fresh pages: 16 x 128 tokens took 2:42 vs 2:16 and 3:05 vs 2:15 in two paired runs,
    peaks 7.1 vs 16.3 and 8.5 GB), so only trace generation uses it. glibc on Linux only; ``MALLOC_MMAP_THRESHOLD_`` in
    the environment wins (glibc then uses that value). Returns whether it took effect."""
    import ctypes
    import sys

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, int(threshold)))


def recorded_states(traces: list[dict], *, states_dir, layers=None, load_model=None):
    """The traces' states at their step ends as recorded during generation (``states_dir``); where they were not
    recorded (or not at ``layers``), re-read by one prefill per trace with the model ``load_model()`` returns,
    called only then. The problems are looked up by the traces' dataset names."""
    from .data import load_data

    try:
        return trace_states(None, None, traces, states_dir=states_dir, layers=layers, progress=False)
    except ValueError:
        if load_model is None:
            raise
        model, tokenizer = load_model()
        problems = {q.id: q for name in sorted({t["dataset"] for t in traces}) for q in load_data(name)}
        return trace_states(model, tokenizer, traces, states_dir=states_dir, layers=layers, problems=problems)
