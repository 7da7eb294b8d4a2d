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

__all__ = ["split_problems", "fit_values", "dopamine_neurons", "transitions"]


def split_problems(problem_ids, test_fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """``True`` for traces whose problem is held out (a hash of the problem id, so stable as data grows)."""
    out = []
    for p in problem_ids:
        h = int(hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        out.append(h < test_fraction)
    return np.asarray(out)


def _stack(states: list[np.ndarray], rewards: np.ndarray):
    X = np.concatenate(states)
    traj = np.concatenate([np.full(len(s), i) for i, s in enumerate(states)])
    step = np.concatenate([np.arange(len(s)) for s in states])
    y = np.repeat(rewards, [len(s) for s in states])
    return X, y, traj, step


def fit_values(states: list[np.ndarray], rewards, test: np.ndarray, *, hidden: int = 32, epochs: int = 40,
               seed: int = 0, max_step: int = 8) -> dict:
    """Fit the final-reward and TD value heads on training traces; score held-out ones.

    ``states[i]`` is ``[n_states, H]`` of trace ``i`` (``s_0 .. s_T``), ``rewards[i]`` its terminal reward.
    Returns both heads, and per objective: AUROC by step index (``0 .. max_step`` and ``last``), ECE/Brier over
    held-out states."""
    rewards = np.asarray(rewards, dtype=int)
    train = [s for s, t in zip(states, test) if not t]
    held = [s for s, t in zip(states, test) if t]
    Xtr, ytr, traj_tr, _ = _stack(train, rewards[~test])
    Xte, yte, traj_te, step_te = _stack(held, rewards[test])
    out: dict = {"n_train_traces": len(train), "n_test_traces": len(held), "n_train_states": len(Xtr),
                 "n_test_states": len(Xte), "heads": {}, "by_objective": {}}
    last = np.r_[traj_te[1:] != traj_te[:-1], True]
    for objective in ("bce", "td"):
        head = MLPProbe(hidden=hidden, epochs=epochs, objective=objective, seed=seed)
        head.fit(Xtr, ytr, trajectory_index=traj_tr)
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
