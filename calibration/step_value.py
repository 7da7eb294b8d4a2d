"""Trajectory mode of ``valueprobe fit``: a value over reasoning steps, written as a ``step_end`` artifact.

The value head (the MLP head, on the whole hooked layer) is trained on the states at ``s_0`` and every step end
of sampled reasoning traces, with the temporal-difference objective (``V(s_t)`` regressed onto ``V(s_{t+1})``, the
last state onto the terminal reward) or plain final-reward regression. The card compares both on problems held
out of fitting (AUROC of ``V(s_t)`` for the final answer by step index, calibration), as in the paper's ablation;
the shipped head is then refitted on every trace. The sidecar uses such an artifact to value candidate steps in
``search`` (``--search-artifact``); it never scores prompts with it (``token_position`` says so, and is checked).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from valueprobe.plugin.artifact import ArtifactData
from valueprobe.plugin.fingerprint import stamp_metadata

from .dopamine import fit_values, split_problems, stack_trace_states
from .probes import LinearProbe, MLPProbe

__all__ = ["fit_step_value"]

OBJECTIVES = ("td", "bce")


def fit_step_value(model, tokenizer, trace_set, *, layer: int, model_name: str, prompt_format, objective: str = "td",
                   epochs: int = 40, seed: int = 0) -> tuple[ArtifactData, dict]:
    """Fit a step value on ``trace_set`` (a :class:`~valueprobe.calibration.trajectories.TraceSet`) at ``layer``;
    returns the artifact and its card."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    if layer not in trace_set.layers:
        raise ValueError(f"the traces hold layers {trace_set.layers}, not {layer}")
    traces = trace_set.traces
    states = trace_set.layer(layer)
    rewards = np.array([t["label"] for t in traces])
    problems = [t["problem"] for t in traces]
    test = split_problems(problems, seed=seed)
    if test.all() or not test.any() or len(np.unique(rewards)) < 2:
        raise ValueError("need right and wrong traces of both training and held-out problems")
    held_out = fit_values(states, rewards, test, epochs=epochs, seed=seed)
    X, y, traj, _ = stack_trace_states(states, rewards)
    head = MLPProbe(hidden=32, epochs=epochs, objective=objective, seed=seed).fit(X, y, trajectory_index=traj)
    # the artifact's required linear slot: final-reward logistic regression on the same states (not the scorer)
    linear = LinearProbe(random_state=seed).fit(X, y)
    width = X.shape[1]
    card = {
        "kind": "step value",
        "model_name": model_name,
        "layer": layer,
        "objective": objective,
        "data": {"traces": len(traces), "problems": len(set(problems)), "states": int(len(X)),
                 "accuracy": float(rewards.mean()), "datasets": sorted({t["dataset"] for t in traces})},
        "held_out": {"problems": len({p for p, t in zip(problems, test) if t}),
                     "traces": int(test.sum()),
                     "by_objective": {o: v for o, v in held_out["by_objective"].items()}},
        "note": "held-out numbers come from heads fitted on the other problems; the shipped head is refitted on all",
    }
    tensors = {
        "neurons.indices": torch.arange(width, dtype=torch.int64),
        "features.mean": torch.tensor(head.standardizer_.mean_, dtype=torch.float32),
        "features.scale": torch.tensor(head.standardizer_.scale_, dtype=torch.float32),
        **{f"head.linear.{k}": v for k, v in linear.head_params().items()},
        **{f"head.mlp.{k}": v.detach().clone() for k, v in head.head_params().items()},
    }
    metadata = {
        "model_name": model_name,
        "hidden_size": str(width),
        "layer": str(layer),
        "token_position": "step_end",
        **stamp_metadata(model, tokenizer, layer, prompt_format),
        "prompt_format": prompt_format.to_json(),
        "objective": objective,
        "head": "mlp",
        "calibrator": "identity",
        "served_score": "value",
        "eval_card": json.dumps(card, sort_keys=True, default=float),
    }
    return ArtifactData(tensors, metadata), card


def render_markdown(card: dict) -> str:
    def f(x):
        return "—" if x is None else f"{x:.3f}"

    d, h = card["data"], card["held_out"]
    lines = [f"# Step value for {card['model_name']} (layer {card['layer']}, {card['objective']} objective)", "",
             f"Fitted on {d['traces']} traces of {d['problems']} problems ({', '.join(d['datasets'])}; {d['states']} "
             f"step states; trace accuracy {d['accuracy']:.3f}). Read at the token ending each step; used by the "
             "sidecar's `search`, never to score prompts.", "",
             f"Held out ({h['problems']} problems, {h['traces']} traces; heads fitted on the other problems):", "",
             "| objective | V(s_0) | V(s_1) | V(s_2) | V(s_3) | V(last) | all states | ECE | Brier |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o, name in (("bce", "final-reward regression"), ("td", "TD")):
        v = h["by_objective"][o]
        s = v["auroc_by_step"]
        lines.append(f"| {name} | " + " | ".join(f(s[t]["auroc"]) for t in ("0", "1", "2", "3", "last"))
                     + f" | {f(v['auroc_all_states'])} | {f(v['ece'])} | {f(v['brier'])} |")
    lines += ["", "AUROC of V(s_t) for the final answer being right, by step index; ECE (10 quantile bins) and Brier "
              "over every held-out state."]
    return "\n".join(lines) + "\n"


def fit_steps_from_traces(model, tokenizer, traces: list[dict], *, states_dir, layer: int, model_name: str,
                          objective: str = "td", seed: int = 0):
    """``(artifact, card)`` of a step-value head fitted on reasoning ``traces`` (``valueprobe traces``): their
    states at ``layer`` are read from ``states_dir``, or re-read by one prefill per trace where they were not
    recorded (the problems are looked up by the traces' dataset names), then :func:`fit_step_value`."""
    from .trajectories import TRACE_FORMAT, recorded_states

    if not traces:
        raise ValueError("no traces to fit on")
    ts = recorded_states(traces, states_dir=states_dir, layers=[layer], load_model=lambda: (model, tokenizer))
    return fit_step_value(model, tokenizer, ts, layer=layer, model_name=model_name, objective=objective,
                          prompt_format=TRACE_FORMAT, seed=seed)
