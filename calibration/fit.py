"""From extracted features to a validated artifact with its eval card.

Splits are by question id (a seeded hash), so every state of one question lands in one split: train (layer and
neuron selection, probe fitting), calibration (calibrator, combiners, thresholds) and test (everything reported).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from valueprobe.plugin.artifact import ArtifactData
from valueprobe.plugin.fingerprint import chat_template_sha256, model_fingerprint, tokenizer_fingerprint
from valueprobe.plugin.prompting import PromptFormat

from .calibrators import CALIBRATOR_CLASSES, PlattCalibrator
from .evaluate import baseline_scores, reliability_dict, score_metrics
from .extract import FeatureSet
from .metrics import auroc_score
from .probes import LinearProbe, MLPProbe
from .selection import NeuronSelector
from .thresholds import escalation_threshold, risk_controlled_threshold

__all__ = ["FitConfig", "split_labels", "fit_artifact"]


@dataclass
class FitConfig:
    """Settings of a fit; recorded in the eval card."""

    seed: int = 0
    train_fraction: float = 0.65
    calibration_fraction: float = 0.15
    tolerance: float = 0.01
    max_fraction: float | None = None
    top_layers: int = 3
    selector_probe: str = "linear"
    head: str = "linear"
    calibrator: str = "platt"
    random_seeds: int = 10
    objective: str = "bce"
    layers: list[int] | None = None
    escalation_rates: tuple = (0.1, 0.2, 0.3)
    risk_alphas: tuple = (0.1, 0.2, 0.3)
    risk_delta: float = 0.1
    progress: bool = True
    extra: dict = field(default_factory=dict)


def split_labels(ids, *, seed: int, train_fraction: float, calibration_fraction: float) -> np.ndarray:
    """``"train"`` / ``"calibration"`` / ``"test"`` per id from a seeded hash: stable under adding questions."""
    out = []
    for qid in ids:
        u = int(hashlib.sha256(f"{seed}:{qid}".encode()).hexdigest()[:12], 16) / float(16**12)
        out.append("train" if u < train_fraction else "calibration" if u < train_fraction + calibration_fraction else "test")
    return np.asarray(out)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _rows_for(fs: FeatureSet, mask) -> list[dict]:
    return [r for r, m in zip(fs.rows, mask) if m]


def _compare(name, y, raw, prob, **extra):
    return {"name": name, **score_metrics(y, raw, prob), **extra}


def _evaluate_split(
    y_te, rows_te, rows_cal, y_cal, X_te, X_cal, X_tr, y_tr, neurons, probe, calibrator, other, other_cal, other_name,
    layer_te, layer_cal, layer_tr, random_sets,
) -> list[dict]:
    """All comparison rows for one test subset."""
    raw = probe.decision_function(X_te)
    rows = [
        _compare("value neurons, calibrated", y_te, raw, calibrator.predict_proba(raw)),
        _compare("value neurons, raw", y_te, raw, _sigmoid(raw)),
        _compare(f"value neurons, {other_name} head", y_te, other.decision_function(X_te),
                 other_cal.predict_proba(other.decision_function(X_te))),
    ]
    dense = LinearProbe().fit(layer_tr, y_tr)
    dense_cal = PlattCalibrator().fit(dense.decision_function(layer_cal), y_cal)
    rows.append(_compare("dense probe, same layer", y_te, dense.decision_function(layer_te),
                         dense_cal.predict_proba(dense.decision_function(layer_te))))
    rand = []
    for subset in random_sets:
        rp = LinearProbe().fit(layer_tr[:, subset], y_tr)
        rc = PlattCalibrator().fit(rp.decision_function(layer_cal[:, subset]), y_cal)
        r_raw = rp.decision_function(layer_te[:, subset])
        rand.append(score_metrics(y_te, r_raw, rc.predict_proba(r_raw)))
    if rand:
        mean = {k: (float(np.mean([r[k] for r in rand])) if all(r[k] is not None for r in rand) else None)
                for k in rand[0] if k not in ("n", "accuracy", "auroc_ci")}
        std = float(np.std([r["auroc"] for r in rand])) if all(r["auroc"] is not None for r in rand) else None
        rows.append({"name": f"random {len(neurons)} neurons, same layer (mean of {len(rand)})", "n": len(y_te),
                     "accuracy": float(np.mean(y_te)), **mean, "auroc_std": std})
    baselines = baseline_scores(rows_te, rows_cal, y_cal)
    for name, (b_raw, b_prob) in baselines.items():
        rows.append(_compare(name, y_te, b_raw, b_prob))
    if "max-softmax" in baselines:
        # Probe + max-softmax: a 2-feature logistic combiner fitted on the calibration split.
        cal_feats = np.c_[probe.decision_function(X_cal), _logit([r["max_softmax"] for r in rows_cal])]
        te_feats = np.c_[raw, _logit(baselines["max-softmax"][0])]
        try:
            comb = LinearProbe(C=1.0).fit(cal_feats, y_cal)
            rows.append(_compare("value neurons + max-softmax", y_te, comb.decision_function(te_feats),
                                 comb.predict_proba(te_feats)))
        except ValueError:
            pass
    return rows


def fit_artifact(
    model,
    tokenizer,
    features: FeatureSet,
    *,
    model_name: str,
    prompt_format: PromptFormat,
    config: FitConfig | None = None,
) -> tuple[ArtifactData, dict]:
    """Select layer and neurons, fit heads and calibrator, evaluate on the test split, build the artifact.

    Returns ``(artifact, card)``; save with :func:`valueprobe.plugin.save_artifact`.
    """
    cfg = config or FitConfig()
    started = time.time()
    y = features.labels
    split = split_labels([r["id"] for r in features.rows], seed=cfg.seed, train_fraction=cfg.train_fraction,
                         calibration_fraction=cfg.calibration_fraction)
    tr, cal, te = split == "train", split == "calibration", split == "test"
    for name, mask in (("train", tr), ("calibration", cal), ("test", te)):
        if len(np.unique(y[mask])) < 2:
            raise ValueError(
                f"the {name} split has {mask.sum()} questions and only one outcome class; more (or more varied) data is needed"
            )
    feats = features.features.numpy().astype(np.float64)
    n_layers, width = feats.shape[1], feats.shape[2]

    selector = NeuronSelector(tolerance=cfg.tolerance, max_fraction=cfg.max_fraction, top_layers=cfg.top_layers, probe=cfg.selector_probe,
                              seed=cfg.seed, layers=cfg.layers, progress=cfg.progress).fit(feats[tr], y[tr])
    layer, neurons = selector.layer_, selector.neurons_
    layer_feats = feats[:, layer - 1, :]
    X = layer_feats[:, neurons]

    probe = LinearProbe().fit(X[tr], y[tr])
    mlp = MLPProbe(seed=cfg.seed, objective=cfg.objective).fit(X[tr], y[tr])
    head_model = probe if cfg.head == "linear" else mlp
    raw_cal = head_model.decision_function(X[cal])
    calibrators = {kind: cls().fit(raw_cal, y[cal]) for kind, cls in CALIBRATOR_CLASSES.items()}
    calibrator = calibrators[cfg.calibrator]
    other = mlp if head_model is probe else probe
    other_cal = PlattCalibrator().fit(other.decision_function(X[cal]), y[cal])

    rng = np.random.default_rng(cfg.seed)
    random_sets = [np.sort(rng.choice(width, size=len(neurons), replace=False)) for _ in range(cfg.random_seeds)]
    common = dict(neurons=neurons, probe=head_model, calibrator=calibrator, other=other, other_cal=other_cal,
                  other_name="MLP" if other is mlp else "linear", random_sets=random_sets)

    def evaluate(test_mask):
        return _evaluate_split(
            y[test_mask], _rows_for(features, test_mask), _rows_for(features, cal), y[cal], X[test_mask], X[cal],
            X[tr], y[tr], layer_te=layer_feats[test_mask], layer_cal=layer_feats[cal], layer_tr=layer_feats[tr],
            **common,
        )

    test_rows = evaluate(te)
    datasets = sorted({r["dataset"] for r in features.rows})
    ds = np.asarray([r["dataset"] for r in features.rows])
    by_dataset = {}
    if len(datasets) > 1:
        for d in datasets:
            m = te & (ds == d)
            if len(np.unique(y[m])) == 2:
                by_dataset[d] = evaluate(m)

    # Transfer: the value-neuron probe fitted on one dataset's train split, scored on another's test split.
    transfer = {}
    if len(datasets) > 1:
        for src in datasets:
            m_src = tr & (ds == src)
            if len(np.unique(y[m_src])) < 2:
                continue
            p = LinearProbe().fit(X[m_src], y[m_src])
            transfer[src] = {}
            for dst in datasets:
                m_dst = te & (ds == dst)
                if len(np.unique(y[m_dst])) == 2:
                    transfer[src][dst] = auroc_score(y[m_dst], p.decision_function(X[m_dst]))

    # The chosen layer's path scored on the test split (fit on train), beside random k of the same sizes.
    for point in selector.paths_[layer]:
        subset = np.asarray(point["neurons"])
        rp = LinearProbe().fit(layer_feats[tr][:, subset], y[tr])
        point["test_auroc"] = auroc_score(y[te], rp.decision_function(layer_feats[te][:, subset]))
    random_curve = []
    for point in selector.paths_[layer]:
        k = point["k"]
        if k >= width:
            continue
        aucs = []
        for s in range(min(cfg.random_seeds, 5)):
            subset = np.sort(np.random.default_rng(1000 + s).choice(width, size=k, replace=False))
            rp = LinearProbe().fit(layer_feats[tr][:, subset], y[tr])
            aucs.append(auroc_score(y[te], rp.decision_function(layer_feats[te][:, subset])))
        random_curve.append({"k": k, "auroc_mean": float(np.mean(aucs)), "auroc_std": float(np.std(aucs))})

    prob_te = calibrator.predict_proba(head_model.decision_function(X[te]))
    prob_cal = calibrator.predict_proba(raw_cal)
    thresholds = {
        "escalation": {f"{r:g}": escalation_threshold(prob_cal, r) for r in cfg.escalation_rates},
        "risk_controlled": {
            f"{a:g}": risk_controlled_threshold(prob_cal, y[cal], alpha=a, delta=cfg.risk_delta).to_dict()
            for a in cfg.risk_alphas
        },
        "source": "calibration split",
    }
    value_row = test_rows[0]
    random_row = next(r for r in test_rows if r["name"].startswith("random"))
    dense_row = next(r for r in test_rows if r["name"].startswith("dense"))
    gap_random = value_row["auroc"] - random_row["auroc"]
    gap_dense = dense_row["auroc"] - value_row["auroc"]
    ci = value_row.get("auroc_ci") or [float("nan")] * 2
    verdict = (
        f"value neurons AUROC {value_row['auroc']:.3f} (95% CI {ci[0]:.2f}–{ci[1]:.2f}, n={value_row['n']}) vs random-{len(neurons)} {random_row['auroc']:.3f} "
        f"(±{random_row['auroc_std']:.3f}) → {'+' if gap_random >= 0 else ''}{gap_random:.3f}; "
        f"dense probe {dense_row['auroc']:.3f} ({gap_dense:+.3f} over the value neurons). "
        + ("The sparse set beats random neurons by ≥ 0.05."
           if gap_random >= 0.05 else "The sparse set does NOT beat random neurons of the same count by 0.05 here.")
    )
    accuracy_by = {d: {"n": int((ds == d).sum()), "accuracy": float(y[ds == d].mean())} for d in datasets}
    card = {
        "model_name": model_name,
        "head": cfg.head,
        "calibrator": cfg.calibrator,
        "objective": cfg.objective,
        "data": accuracy_by,
        "splits": {"seed": cfg.seed, "n_train": int(tr.sum()), "n_calibration": int(cal.sum()), "n_test": int(te.sum()),
                   "fractions": [cfg.train_fraction, cfg.calibration_fraction,
                                 round(1 - cfg.train_fraction - cfg.calibration_fraction, 6)]},
        "selection": {
            "layer": int(layer), "n_layers": n_layers, "k": int(len(neurons)), "width": width,
            "fraction": len(neurons) / width, "tolerance": cfg.tolerance, "probe": cfg.selector_probe,
            "layer_auroc": selector.layer_auroc_, "cv_auroc": selector.cv_auroc_,
            "path": [{k: v for k, v in p.items() if k != "neurons"} for p in selector.paths_[layer]],
            "paths": {str(l): [{k: v for k, v in p.items() if k != "neurons"} for p in path]
                      for l, path in selector.paths_.items()},
        },
        "test": test_rows,
        "test_by_dataset": by_dataset,
        "transfer": transfer,
        "random_k_curve": random_curve,
        "calibrators": {kind: score_metrics(y[te], head_model.decision_function(X[te]), c.predict_proba(
            head_model.decision_function(X[te]))) for kind, c in calibrators.items()},
        "reliability": reliability_dict(y[te], prob_te),
        "verdict": verdict,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
        "fit_seconds": round(time.time() - started, 1),
    }
    tensors = {
        "neurons.indices": torch.as_tensor(neurons, dtype=torch.int64),
        "features.mean": torch.tensor(head_model.standardizer_.mean_, dtype=torch.float32),
        "features.scale": torch.tensor(head_model.standardizer_.scale_, dtype=torch.float32),
    }
    # Both heads ride along; the metadata's ``head`` says which one scores.
    tensors.update({f"head.linear.{k}": v for k, v in probe.head_params().items()})
    tensors.update({f"head.mlp.{k}": v for k, v in mlp.head_params().items()})
    if not np.allclose(probe.standardizer_.mean_, mlp.standardizer_.mean_):
        raise AssertionError("both heads must share one standardisation")
    tensors.update({f"calibrator.{k}": torch.tensor(v, dtype=torch.float64) for k, v in calibrator.to_params().items()})
    metadata = {
        "producer": "valueprobe 0.1.0",
        "model_name": model_name,
        "hidden_size": str(width),
        "layer": str(layer),
        "model_fingerprint": json.dumps(model_fingerprint(model, layer), sort_keys=True),
        "tokenizer_fingerprint": json.dumps(tokenizer_fingerprint(tokenizer), sort_keys=True),
        "chat_template_sha256": chat_template_sha256(tokenizer),
        "prompt_format": prompt_format.to_json(),
        "objective": cfg.objective,
        "head": cfg.head,
        "calibrator": cfg.calibrator,
        "thresholds": json.dumps(thresholds, sort_keys=True),
        "eval_card": json.dumps(card, sort_keys=True, default=float),
    }
    return ArtifactData(tensors, metadata), card
