"""Value over reasoning steps and the dopamine neurons that track its temporal-difference error.

Given states along traces (``s_0`` = last prompt token, ``s_t`` = end of step ``t``) and each trace's terminal
reward (final answer right or wrong), on a split by *problem* (held-out problems are never fitted on):

1. **Value over steps.** An MLP value head ``V(s)`` is fitted on training traces two ways: plain final-reward
   regression (every state predicts the terminal reward) and temporal-difference learning (``V(s_t)`` regressed
   onto ``V(s_{t+1})``, the last state onto the reward). Reported on held-out traces: AUROC of ``V(s_t)`` for final
   correctness at each step index, and calibration (ECE, Brier) over all states, as in the paper's ablation.
2. **Dopamine neurons.** With the TD value head, ``delta_t = V(s_{t+1}) - V(s_t)`` for every transition inside a
   trace. Neurons are ranked by |Spearman| between their activation at ``s_{t+1}`` and ``delta_t`` on training
   transitions; the top ``k`` (1% of the width by default) feed a ridge readout of ``delta``, whose held-out
   Spearman is compared with many random ``k``-sets (same ridge), and with the value neurons (overlap).
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .metrics import auroc_score, brier_loss, expected_calibration_error
from .probes import MLPProbe

__all__ = ["split_problems", "stack_trace_states", "fit_value_head", "fit_values", "dopamine_neurons", "transitions"]


def split_problems(problem_ids, test_fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """``True`` for traces whose problem is held out (a hash of the problem id, so stable as data grows)."""
    out = []
    for p in problem_ids:
        h = int(hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        out.append(h < test_fraction)
    return np.asarray(out)


def stack_trace_states(states: list[np.ndarray], rewards: np.ndarray):
    """Every state of every trace in one matrix: ``(X [n, H], reward of its trace, trace index, step index)``."""
    X = np.concatenate(states)
    traj = np.concatenate([np.full(len(s), i) for i, s in enumerate(states)])
    step = np.concatenate([np.arange(len(s)) for s in states])
    y = np.repeat(rewards, [len(s) for s in states])
    return X, y, traj, step


def fit_value_head(states: list[np.ndarray], rewards, *, objective: str = "td", hidden: int = 32, epochs: int = 40,
                   seed: int = 0) -> MLPProbe:
    """An MLP value head fitted on every state of ``states`` (``[n_states, H]`` per trace) against its trace's
    terminal reward, with the ``td`` or ``bce`` (final-reward) objective."""
    X, y, traj, _ = stack_trace_states(states, np.asarray(rewards, dtype=int))
    return MLPProbe(hidden=hidden, epochs=epochs, objective=objective, seed=seed).fit(X, y, trajectory_index=traj)


def fit_values(states: list[np.ndarray], rewards, test: np.ndarray, *, hidden: int = 32, epochs: int = 40,
               seed: int = 0, max_step: int = 8) -> dict:
    """Fit the final-reward and TD value heads on training traces; score held-out ones.

    ``states[i]`` is ``[n_states, H]`` of trace ``i`` (``s_0 .. s_T``), ``rewards[i]`` its terminal reward.
    Returns both heads, and per objective: AUROC by step index (``0 .. max_step`` and ``last``), ECE/Brier over
    held-out states."""
    rewards = np.asarray(rewards, dtype=int)
    train = [s for s, t in zip(states, test) if not t]
    held = [s for s, t in zip(states, test) if t]
    Xte, yte, traj_te, step_te = stack_trace_states(held, rewards[test])
    out: dict = {"n_train_traces": len(train), "n_test_traces": len(held), "n_train_states": sum(len(s) for s in train),
                 "n_test_states": len(Xte), "heads": {}, "by_objective": {}}
    last = np.r_[traj_te[1:] != traj_te[:-1], True]
    for objective in ("bce", "td"):
        head = fit_value_head(train, rewards[~test], objective=objective, hidden=hidden, epochs=epochs, seed=seed)
        p = head.predict_proba(Xte)
        by_step = {}
        for t in range(max_step + 1):
            m = step_te == t
            by_step[str(t)] = _auroc_or_none(yte[m], p[m]) | {"n": int(m.sum())}
        by_step["last"] = _auroc_or_none(yte[last], p[last]) | {"n": int(last.sum())}
        out["heads"][objective] = head
        out["by_objective"][objective] = {
            "auroc_by_step": by_step,
            "auroc_all_states": _auroc_or_none(yte, p)["auroc"],
            "ece": expected_calibration_error(yte, p, n_bins=10, strategy="quantile"),
            "brier": brier_loss(yte, p),
        }
    return out


def _auroc_or_none(y, p) -> dict:
    if len(y) < 5 or len(np.unique(y)) < 2:
        return {"auroc": None}
    return {"auroc": float(auroc_score(y, p))}


def transitions(states: list[np.ndarray], head) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(activations at s_{t+1}, delta_t, trace index)`` for every within-trace transition, with
    ``delta_t = V(s_{t+1}) - V(s_t)`` from ``head`` (a probability-valued value head)."""
    acts, deltas, which = [], [], []
    for i, s in enumerate(states):
        if len(s) < 2:
            continue
        v = head.predict_proba(s)
        acts.append(s[1:])
        deltas.append(np.diff(v))
        which.append(np.full(len(s) - 1, i))
    if not acts:
        raise ValueError("no trace has two states")
    return np.concatenate(acts), np.concatenate(deltas), np.concatenate(which)


def _rank_by_spearman(X: np.ndarray, d: np.ndarray) -> np.ndarray:
    """|Spearman| of every column of ``X`` with ``d`` (ranks computed once; Pearson on ranks)."""
    from scipy.stats import rankdata

    rx = np.apply_along_axis(rankdata, 0, X)
    rd = rankdata(d)
    rx = (rx - rx.mean(0)) / (rx.std(0) + 1e-12)
    rd = (rd - rd.mean()) / (rd.std() + 1e-12)
    return np.abs((rx * rd[:, None]).mean(0))


def _ridge_spearman(Xtr, dtr, Xte, dte, cols, alpha: float) -> float:
    model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(Xtr[:, cols], dtr)
    rho = spearmanr(model.predict(Xte[:, cols]), dte).statistic
    return float(0.0 if np.isnan(rho) else rho)


def dopamine_neurons(states: list[np.ndarray], test: np.ndarray, td_head, *, k: int | None = None,
                     random_draws: int = 200, alpha: float = 10.0, value_neurons=None, seed: int = 0) -> dict:
    """Top-``k`` neurons by |Spearman(activation at s_{t+1}, delta_t)| on training transitions, their ridge readout's
    held-out Spearman with delta, against ``random_draws`` random ``k``-sets; overlap with ``value_neurons``."""
    train_states = [s for s, t in zip(states, test) if not t]
    test_states = [s for s, t in zip(states, test) if t]
    Xtr, dtr, _ = transitions(train_states, td_head)
    Xte, dte, which_te = transitions(test_states, td_head)
    width = Xtr.shape[1]
    k = k or max(1, width // 100)
    ranking = _rank_by_spearman(Xtr, dtr)
    chosen = np.argsort(-ranking)[:k]
    rho = _ridge_spearman(Xtr, dtr, Xte, dte, chosen, alpha)
    rng = np.random.default_rng(seed)
    random_rhos = np.array([_ridge_spearman(Xtr, dtr, Xte, dte, rng.choice(width, k, replace=False), alpha)
                            for _ in range(random_draws)])
    dense = _ridge_spearman(Xtr, dtr, Xte, dte, np.arange(width), alpha * width / k)
    overlap = None
    if value_neurons is not None:
        overlap = sorted(set(int(i) for i in chosen) & set(int(i) for i in value_neurons))
    return {
        "k": int(k), "width": int(width), "share": k / width, "neurons": [int(i) for i in chosen],
        "train_abs_spearman": [float(ranking[i]) for i in chosen],
        "n_train_transitions": int(len(dtr)), "n_test_transitions": int(len(dte)),
        "heldout_spearman": rho, "random_mean": float(random_rhos.mean()), "random_sd": float(random_rhos.std()),
        "random_draws": int(random_draws), "percentile_vs_random": float((random_rhos < rho).mean() * 100),
        "dense_spearman": dense, "overlap_with_value_neurons": overlap,
        "test_delta": dte, "test_acts": Xte[:, chosen], "test_trace_index": which_te,
    }


def report(trace_set, *, value_neurons=None, value_layer=None, k: int | None = None, random_draws: int = 200,
           epochs: int = 40, seed: int = 0, plot_path=None) -> tuple[dict, str]:
    """The whole study on a :class:`~valueprobe.calibration.trajectories.TraceSet`: layer chosen by the TD head's
    held-out-by-problem AUROC *inside the training problems* (a validation split of them), then value heads and
    dopamine neurons on that layer, scored on the held-out problems. Returns ``(result, markdown)``."""
    traces = trace_set.traces
    rewards = np.array([t["label"] for t in traces])
    problems = [t["problem"] for t in traces]
    test = split_problems(problems, seed=seed)
    if test.all() or not test.any():
        raise ValueError("need traces of both training and held-out problems")
    # layer choice without the held-out problems: split the training problems again
    inner = split_problems(problems, seed=seed + 1) & ~test
    scan = {}
    for layer in trace_set.layers:
        states = trace_set.layer(layer)
        keep = ~test
        res = fit_values([s for s, kk in zip(states, keep) if kk], rewards[keep], inner[keep], epochs=epochs,
                         seed=seed)
        scan[layer] = res["by_objective"]["td"]["auroc_all_states"]
    valid = {layer: a for layer, a in scan.items() if a is not None}
    layer = max(valid, key=valid.get) if valid else trace_set.layers[-1]
    states = trace_set.layer(layer)
    values = fit_values(states, rewards, test, epochs=epochs, seed=seed)
    vn = value_neurons if (value_neurons is not None and value_layer == layer) else None
    dop = dopamine_neurons(states, test, values["heads"]["td"], k=k, random_draws=random_draws, value_neurons=vn,
                           seed=seed)
    result = {
        "n_traces": len(traces), "n_problems": len(set(problems)), "accuracy": float(rewards.mean()),
        "held_out_problems": len({p for p, t in zip(problems, test) if t}),
        "mixed_problems": sum(0 < rewards[[p == q for p in problems]].mean() < 1 for q in set(problems)),
        "layer_scan_td_auroc_validation": scan, "layer": layer,
        "values": {o: v for o, v in values["by_objective"].items()},
        "dopamine": {k_: v for k_, v in dop.items() if not k_.startswith("test_")},
    }
    if plot_path is not None:
        _plot(trace_set, states, test, values["heads"]["td"], dop, plot_path)
        result["plot"] = str(plot_path)
    return result, _markdown(result, value_layer)


def _plot(trace_set, states, test, head, dop, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = [i for i, t in enumerate(test) if t and len(states[i]) >= 3]
    right = next((i for i in held if trace_set.traces[i]["label"] == 1), None)
    wrong = next((i for i in held if trace_set.traces[i]["label"] == 0), None)
    picks = [(i, name) for i, name in ((right, "correct"), (wrong, "failing")) if i is not None]
    if not picks:
        return
    fig, axes = plt.subplots(2, len(picks), figsize=(5.5 * len(picks), 6), squeeze=False)
    top = dop["neurons"][:3]
    for col, (i, name) in enumerate(picks):
        v = head.predict_proba(states[i])
        delta = np.diff(v)
        ax = axes[0, col]
        ax.plot(range(len(v)), v, "o-", label="V(s_t)")
        ax.bar(np.arange(1, len(v)) , delta, alpha=0.4, color=np.where(delta >= 0, "tab:green", "tab:red"),
               label="δ_t = V(s_t) − V(s_t−1)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{name} trace {trace_set.traces[i]['id']} (reward {trace_set.traces[i]['label']})")
        ax.set_xlabel("step t")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        acts = states[i][:, top]
        z = (acts - acts.mean(0)) / (acts.std(0) + 1e-9)
        for j, n in enumerate(top):
            ax.plot(range(len(v)), z[:, j], ".-", label=f"neuron {n}")
        ax.set_xlabel("step t")
        ax.set_ylabel("activation (z within trace)")
        ax.legend(fontsize=8)
    fig.suptitle("Value and dopamine neurons along held-out traces: positive surprise (green), negative (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(r: dict, value_layer) -> str:
    def f(x):
        return "—" if x is None else f"{x:.3f}"

    lines = [f"Traces: {r['n_traces']} of {r['n_problems']} problems (accuracy {r['accuracy']:.3f}; "
             f"{r['mixed_problems']} problems with right and wrong traces); {r['held_out_problems']} problems held out.",
             "", f"Layer {r['layer']} (TD head's AUROC on a validation split of the training problems: "
             + ", ".join(f"{k}: {f(v)}" for k, v in r["layer_scan_td_auroc_validation"].items()) + ").", "",
             "| objective | AUROC V(s_0) | V(s_1) | V(s_2) | V(s_3) | V(last) | all states | ECE | Brier |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o, name in (("bce", "final-reward regression"), ("td", "TD")):
        v = r["values"][o]
        s = v["auroc_by_step"]
        lines.append(f"| {name} | " + " | ".join(f(s[t]["auroc"]) + f" (n={s[t]['n']})" for t in ("0", "1", "2", "3", "last"))
                     + f" | {f(v['auroc_all_states'])} | {f(v['ece'])} | {f(v['brier'])} |")
    d = r["dopamine"]
    lines += ["", f"Dopamine neurons: k={d['k']} of {d['width']} ({100 * d['share']:.2f}%), ranked by |Spearman| with "
              f"δ_t on {d['n_train_transitions']} training transitions; ridge readout on held-out transitions "
              f"(n={d['n_test_transitions']}): Spearman **{d['heldout_spearman']:.3f}** vs random k-sets "
              f"{d['random_mean']:.3f} ± {d['random_sd']:.3f} ({d['random_draws']} draws; chosen set at the "
              f"{d['percentile_vs_random']:.0f}th percentile); dense layer {d['dense_spearman']:.3f}. Neurons "
              f"{d['neurons']}; overlap with the value neurons: "
              + (str(d["overlap_with_value_neurons"]) if d["overlap_with_value_neurons"] is not None
                 else f"not comparable (value neurons are on layer {value_layer})") + "."]
    target = d["heldout_spearman"] >= 0.3 and d["heldout_spearman"] >= 2 * max(d["random_mean"], 1e-9)
    lines.append(f"Target (held-out Spearman ≥ 0.3 and ≥ 2× the random mean): {'MET' if target else 'NOT MET'}.")
    return "\n".join(lines)
