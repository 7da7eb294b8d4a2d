"""Causal check: does knocking out the value neurons hurt the model's answers more than knocking out others?

The value neurons are zeroed (or set to their mean) at their layer, at every position, while the model answers
multiple-choice questions; the drop in accuracy is compared with ablating k random neurons of the same layer,
matched by activation magnitude (each value neuron is replaced by a random neuron from the same magnitude
decile), over several seeds. Two tests are reported:

* McNemar's exact test, baseline vs value-neuron ablation, on the same questions (paired);
* an empirical p-value: how often a random magnitude-matched ablation drops accuracy at least as much.

This is the control that the seed work was criticised for missing: a probe can read a signal that the model does
not use.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from valueprobe.plugin.hooks import capture, find_decoder_layers, with_position_ids
from valueprobe.plugin.prompting import PromptFormat

from .data import Question
from .metrics import mcnemar_p

__all__ = ["ablate_neurons", "magnitude_matched", "ablation_study", "trace_ablation_study"]


@contextlib.contextmanager
def ablate_neurons(model, layer: int, neurons, values=None):
    """Context manager: overwrite ``neurons`` of layer ``layer``'s output with ``values`` (default 0) everywhere."""
    block = find_decoder_layers(model).block(layer)
    idx = torch.as_tensor(np.asarray(neurons), dtype=torch.long)
    fill = None if values is None else torch.as_tensor(np.asarray(values), dtype=torch.float32)

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        hidden = hidden.clone()
        hidden[..., idx.to(hidden.device)] = 0 if fill is None else fill.to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def magnitude_matched(neurons, magnitude: np.ndarray, rng: np.random.Generator, bins: int = 10) -> np.ndarray:
    """For each neuron, a random other neuron from the same magnitude quantile bin (no repeats, no overlap)."""
    neurons = np.asarray(neurons)
    edges = np.quantile(magnitude, np.linspace(0, 1, bins + 1))
    bin_of = np.clip(np.searchsorted(edges, magnitude, side="right") - 1, 0, bins - 1)
    taken = set(neurons.tolist())
    out = []
    for n in neurons:
        pool = [i for i in np.flatnonzero(bin_of == bin_of[n]) if i not in taken]
        if not pool:
            pool = [i for i in range(len(magnitude)) if i not in taken]
        pick = int(rng.choice(pool))
        taken.add(pick)
        out.append(pick)
    return np.asarray(out)


@torch.inference_mode()
def _answers(model, tokenizer, fmt: PromptFormat, questions: list[Question], batch_size: int) -> np.ndarray:
    correct = []
    device = next(model.parameters()).device
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        enc = fmt.tokenize(tokenizer, [fmt.render(tokenizer, q.prompt()) for q in batch]).to(device)
        logits = model(**with_position_ids(enc), use_cache=False).logits[:, -1, :].float().cpu()
        for i, q in enumerate(batch):
            ids = fmt.letter_token_ids(tokenizer, len(q.choices))
            correct.append(int(int(logits[i, ids].argmax()) == q.answer))
    return np.asarray(correct)


def ablation_study(model, tokenizer, probe, questions: list[Question], *, seeds: int = 5, mode: str = "zero",
                   batch_size: int = 8, progress: bool = True) -> dict:
    """Accuracy with no ablation, with the value neurons ablated, and with magnitude-matched random ablations."""
    questions = [q for q in questions if q.choices]
    if not questions:
        raise ValueError("the ablation study needs multiple-choice questions")
    if mode not in ("zero", "mean"):
        raise ValueError("mode must be 'zero' or 'mean'")
    fmt = probe.prompt_format
    layer, neurons = probe.layer, probe.neuron_indices.numpy()
    # Activation statistics at the last prompt token, for magnitude matching and mean-ablation.
    device = next(model.parameters()).device
    stats = []
    for start in range(0, len(questions), batch_size):
        texts = [fmt.render(tokenizer, q.prompt()) for q in questions[start : start + batch_size]]
        enc = fmt.tokenize(tokenizer, texts).to(device)
        with torch.inference_mode(), capture(model, [layer], stop_after=True) as cap:
            model(**with_position_ids(enc), use_cache=False)
        stats.append(cap.batches[0][layer])
    acts = torch.cat(stats).numpy()
    magnitude, mean = np.abs(acts).mean(0), acts.mean(0)

    def run(subset):
        fill = None if mode == "zero" else mean[subset]
        with ablate_neurons(model, layer, subset, fill):
            return _answers(model, tokenizer, fmt, questions, batch_size)

    rng = np.random.default_rng(0)
    steps = tqdm(total=2 + seeds, desc="ablate", disable=not progress)
    base = _answers(model, tokenizer, fmt, questions, batch_size)
    steps.update()
    value = run(neurons)
    steps.update()
    random_drops, random_sets = [], []
    for _ in range(seeds):
        subset = magnitude_matched(neurons, magnitude, rng)
        random_sets.append(subset.tolist())
        random_drops.append(float(base.mean() - run(subset).mean()))
        steps.update()
    steps.close()
    value_drop = float(base.mean() - value.mean())
    return {
        "n": len(questions),
        "layer": layer,
        "k": int(len(neurons)),
        "neurons": [int(n) for n in neurons],
        "mode": mode,
        "accuracy": float(base.mean()),
        "accuracy_value_ablated": float(value.mean()),
        "value_drop": value_drop,
        "random_drop_mean": float(np.mean(random_drops)),
        "random_drop_std": float(np.std(random_drops)),
        "random_drops": random_drops,
        "p_mcnemar_value": mcnemar_p(base, value),
        "p_empirical_vs_random": (1 + sum(d >= value_drop for d in random_drops)) / (1 + seeds),
        "random_sets": random_sets,
    }


@torch.inference_mode()
def _trace_nll(model, tokenizer, fmt: PromptFormat, traces: list[dict], problems: dict[str, Question]) -> np.ndarray:
    """Per trace: mean negative log-likelihood of its own generated tokens (teacher-forced, one forward each), and
    of its last step's tokens (the answer line). ``[n, 2]``."""
    device = next(model.parameters()).device
    special = fmt.adds_special_tokens(tokenizer)
    out = []
    for t in traces:
        prompt = tokenizer(fmt.render(tokenizer, problems[t["problem"]].prompt()), add_special_tokens=special)["input_ids"]
        ids = torch.tensor([prompt + t["tokens"]], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="none").cpu().numpy()
        last_start = t["step_ends"][-2] + 1 if len(t["step_ends"]) >= 2 else 0
        out.append((nll.mean(), nll[last_start:].mean()))
    return np.asarray(out)


def trace_ablation_study(model, tokenizer, traces: list[dict], problems: dict[str, Question], *, layer: int,
                         neurons, states: list[np.ndarray], fmt: PromptFormat, seeds: int = 4, mode: str = "mean",
                         seed: int = 0, progress: bool = True) -> dict:
    """Causal check for step-level neurons (e.g. the dopamine neurons): how much worse the model predicts its own
    reasoning traces (teacher-forced NLL of the generated tokens, and of the answer line) with ``neurons`` of
    ``layer`` ablated at every position, against ``seeds`` magnitude-matched random sets of the same size.
    ``states`` (``[n_states, H]`` per trace, at that layer) give the activation magnitudes and means."""
    if mode not in ("zero", "mean"):
        raise ValueError("mode must be 'zero' or 'mean'")
    neurons = np.asarray(neurons)
    acts = np.concatenate(states)
    magnitude, mean = np.abs(acts).mean(0), acts.mean(0)

    def run(subset):
        with ablate_neurons(model, layer, subset, None if mode == "zero" else mean[subset]):
            return _trace_nll(model, tokenizer, fmt, traces, problems)

    bar = tqdm(total=2 + seeds, desc="ablate traces", disable=not progress)
    base = _trace_nll(model, tokenizer, fmt, traces, problems)
    bar.update()
    chosen = run(neurons) - base
    bar.update()
    rng = np.random.default_rng(seed)
    random_deltas, random_sets = [], []
    for _ in range(seeds):
        subset = magnitude_matched(neurons, magnitude, rng)
        random_sets.append(subset.tolist())
        random_deltas.append((run(subset) - base).mean(0))
        bar.update()
    bar.close()
    random_deltas = np.asarray(random_deltas)
    delta = chosen.mean(0)
    return {
        "n_traces": len(traces), "layer": layer, "k": int(len(neurons)), "neurons": [int(n) for n in neurons],
        "mode": mode,
        "nll_base": base.mean(0).tolist(),
        "delta_nll_chosen": delta.tolist(),
        "delta_nll_random_mean": random_deltas.mean(0).tolist(),
        "delta_nll_random_std": random_deltas.std(0).tolist(),
        "delta_nll_random": random_deltas.tolist(),
        "p_empirical_vs_random": [(1 + int((random_deltas[:, j] >= delta[j]).sum())) / (1 + seeds) for j in range(2)],
        "columns": ["all generated tokens", "answer line"],
        "random_sets": random_sets,
    }


def study_provenance(study) -> dict:
    """Which dopamine study's neurons an ablation record is about: the study file, its sha256 and size."""
    import hashlib
    import json
    from pathlib import Path

    study = Path(study)
    result = json.loads(study.read_text())
    return {"file": str(study), "sha256": hashlib.sha256(study.read_bytes()).hexdigest(),
            "n_traces": result.get("n_traces"), "n_problems": result.get("n_problems"), "layer": result.get("layer")}


def dopamine_ablation(model, tokenizer, study, traces: list[dict], *, states_dir, n_traces: int = 16,
                      seeds: int = 5, mode: str = "zero", seed: int = 0) -> dict:
    """The dopamine study's neurons (``valueprobe dopamine --out``) ablated while ``model`` re-reads its held-out
    traces (teacher-forced NLL), against magnitude-matched random neuron sets: :func:`trace_ablation_study` on the
    study's own held-out problems (its neurons were ranked on the others), with the study's provenance."""
    import json
    from pathlib import Path

    from .data import load_data
    from .dopamine import split_problems
    from .trajectories import TRACE_FORMAT, trace_states

    result = json.loads(Path(study).read_text())
    layer, neurons = result["layer"], result["dopamine"]["neurons"]
    if not traces:
        raise ValueError("no traces to re-read")
    held = [t for t, h in zip(traces, split_problems([t["problem"] for t in traces], seed=seed)) if h][:n_traces]
    problems = {q.id: q for ds in sorted({t["dataset"] for t in traces}) for q in load_data(ds)}
    ts = trace_states(model, tokenizer, traces, states_dir=states_dir, layers=[layer], problems=problems)
    r = trace_ablation_study(model, tokenizer, held, problems, layer=layer, neurons=neurons, states=ts.layer(layer),
                             fmt=TRACE_FORMAT, seeds=seeds, mode=mode, seed=seed)
    return {**r, "layer": layer, "study": study_provenance(study)}
