"""From extracted features to a validated artifact with its eval card.

Splits are by question id (a seeded hash, :mod:`.splits`): train (neuron selection, heads, stackers), calibration
(calibrators, OOD threshold, serving thresholds) and test (the within-distribution report). Layer, k and head are
chosen by leave-one-source-out AUROC (:mod:`.transfer`), which is also the card's headline robustness number.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from valueprobe.plugin.artifact import ANSWER_END, TOKEN_POSITION, ArtifactData, load_artifact, save_artifact
from valueprobe.plugin.fingerprint import stamp_metadata
from valueprobe.plugin.nexttoken import KINDS
from valueprobe.plugin.probe import ValueProbe
from valueprobe.plugin.prompting import PromptFormat
from valueprobe.plugin.readout import ANSWER_STACK_FEATURES, ANSWER_STACK_FEATURES_V2, STACK_FEATURES

from .evaluate import ANSWER_BASELINES, BASELINES, reliability_dict, score_metrics, served_label
from .extract import FeatureSet
from .metrics import auroc_score
from .probes import LinearProbe
from .splits import split_labels
from .thresholds import escalation_threshold, risk_controlled_threshold
from .transfer import (
    K_GRID,
    ConfidenceModel,
    NextTokenStack,
    cv_auroc,
    Side,
    balanced_weights,
    loso_layer_scan,
    loso_study,
    prune_path,
)

__all__ = ["FitConfig", "split_labels", "fit_artifact", "served_answer_predictions"]


@dataclass
class FitConfig:
    """Settings of a fit; recorded in the eval card."""

    seed: int = 0
    train_fraction: float = 0.6
    calibration_fraction: float = 0.15
    tolerance: float = 0.01
    max_fraction: float | None = 0.01
    layers: list[int] | None = None       # candidate layers; default: every second layer of the upper two thirds
    heads: tuple = ("linear", "mlp")
    random_draws: int = 100
    balance: bool = True                  # balanced_weights: equal weight per source and per outcome within it
    objective: str = "bce"
    escalation_rates: tuple = (0.1, 0.2, 0.3)
    risk_alphas: tuple = (0.1, 0.2, 0.3)
    risk_delta: float = 0.1
    progress: bool = True
    extra: dict = field(default_factory=dict)
    # answer_end fits (issue 31): how the answer is read ("last" token or "mean" of its tokens), a stacker that is
    # monotone in the free signals, and k chosen by the average of the mean and the minimum over left-out sources
    answer_read: str = "last"
    monotone: bool = True
    k_criterion: str = "mean+min"
    # the served probability's last map per kind: "split" (Platt on the calibration split, in distribution),
    # "out_of_source" (Platt on the leave-one-source-out predictions: what a probability means on a source the
    # model never saw) or "auto" (the one with the lower mean cross-fitted ECE over left-out sources)
    answer_calibration: str = "auto"
    # ablations of the answer-level recipe: the first stack layout (no mean log-prob, no log options) and no free
    # signal served alone (the modes of the first recipe: stacked, next_token, value)
    answer_layout: str = "v2"
    answer_free_modes: bool = True


@dataclass
class SplitData:
    """One evaluation subset: the chosen layer's states, labels, side information and extraction rows."""

    X: np.ndarray
    y: np.ndarray
    side: Side
    rows: list[dict]


@dataclass
class FittedParts:
    """Everything fitted on train/calibration that the test rows are compared with. ``served`` is the artifact
    as written, read back by :class:`~valueprobe.plugin.ValueProbe`: the card's served numbers come from the
    serving code."""

    served: ValueProbe
    other_head: ConfidenceModel | None
    dense: LinearProbe
    next_token: NextTokenStack
    random_sets: list
    random_probes: list
    calibration: SplitData
    #: the served mode per kind (the card's ``served_by_kind``): names the served row (:func:`served_label`)
    served_modes: dict | None = None


def _candidate_layers(n_layers: int) -> list[int]:
    """Every layer of small models; every second layer of the upper two thirds (and the last) of deep ones:
    the signal sits in the middle-to-late layers, and each candidate costs one dense fit per source."""
    if n_layers <= 12:
        return list(range(1, n_layers + 1))
    return sorted(set(range(n_layers // 3, n_layers + 1, 2)) | {n_layers})


def _row(name, y, score, prob=None, **extra):
    return {"name": name, **score_metrics(y, score, prob), **extra}


def served_predictions(probe: ValueProbe, X: np.ndarray, side: Side) -> dict[str, np.ndarray]:
    """The served numbers of rows of one layer's states ``X`` (every unit), as the sidecar computes them."""
    return probe.predict(X[:, probe.neuron_indices.numpy()], side.max_softmax, side.entropy, side.kind,
                         extra=side.extra)


def served_answer_predictions(probe: ValueProbe, fs: FeatureSet) -> dict[str, np.ndarray]:
    """The served numbers of an answer_end artifact on an answer-end extraction ``fs``: the answer read as the
    artifact reads it (``answer_read``) and the stack columns it names, as the sidecar computes them."""
    names = probe.stack_columns or ANSWER_STACK_FEATURES
    X = fs.answer_read(probe.answer_read)[:, probe.layer - 1].numpy().astype(np.float64)
    return served_predictions(probe, X, Side.from_answer_rows(fs.rows, names))


# What the stacker's free columns are called in the card, per read position (see transfer.Side).
FREE_SIGNALS = {TOKEN_POSITION: "next-token", ANSWER_END: "answer token log-probs"}


def _evaluate(parts: FittedParts, data: SplitData) -> list[dict]:
    """The comparison rows for one test subset (all fitted on train/calibration only)."""
    y = data.y
    comp = served_predictions(parts.served, data.X, data.side)
    free = FREE_SIGNALS[parts.served.token_position]
    rows = [
        _row(f"served score ({served_label(parts.served_modes, free)})", y, comp["probability"], comp["probability"]),
        _row("value neurons, calibrated", y, comp["value_raw"], comp["value_probability"]),
    ]
    if parts.other_head is not None:
        oc = parts.other_head.components(data.X, data.side)
        rows.append(_row(f"served score, {parts.other_head.head} head", y, oc["probability"], oc["probability"]))
    nts = parts.next_token.predict_proba(data.side)
    if np.isfinite(nts).all():
        rows.append(_row("next-token stack (max-softmax + entropy, per kind)" if free == "next-token" else
                         "free stack (next-token + answer sum and min log-prob, per kind)", y, nts, nts))
    rows.append(_row("dense probe, same layer", y, parts.dense.decision_function(data.X)))
    # AUROC only (no bootstrap interval per draw: 100 draws x 500 resamples would dominate the fit's time).
    rand = [auroc_score(y, p.decision_function(data.X[:, s])) if len(np.unique(y)) == 2 else None
            for s, p in zip(parts.random_sets, parts.random_probes)]
    rand = np.array([r for r in rand if r is not None])
    value_auroc = rows[1]["auroc"]
    if len(rand) and value_auroc is not None:
        rows.append({"name": f"random {len(parts.random_sets[0])} neurons, linear head ({len(rand)} draws)",
                     "n": len(y), "accuracy": float(np.mean(y)), "auroc": float(rand.mean()),
                     "auroc_std": float(rand.std()), "value_percentile": float((rand < value_auroc).mean() * 100)})
    for name, getter in (BASELINES if free == "next-token" else ANSWER_BASELINES).items():
        vals = getter(data.rows)
        if all(v is not None for v in vals):
            rows.append(_row(name, y, np.asarray(vals, dtype=np.float64)))
    return rows


def fit_artifact(
    model,
    tokenizer,
    features: FeatureSet,
    *,
    model_name: str,
    prompt_format: PromptFormat,
    config: FitConfig | None = None,
    token_position: str = TOKEN_POSITION,
) -> tuple[ArtifactData, dict]:
    """Choose layer, k and head by leave-one-source-out AUROC, fit the served confidence (value neurons stacked
    with the next-token signal, per kind, Platt-calibrated per kind, with an OOD distance), evaluate it on the
    test split and on every left-out source, and build the artifact.

    ``token_position="answer_end"``: ``features`` were read at the end of the model's own answer
    (:func:`~valueprobe.calibration.extract.extract_answer_end`) and the free signal stacked with the value
    neurons is the answer's token log-probabilities (:meth:`Side.from_answer_rows`); the answer-side baselines
    (and ``prompt_probability``, the prompt-only served score, where rows carry it) are compared in every table.

    Returns ``(artifact, card)``; save with :func:`valueprobe.plugin.save_artifact`.
    """
    cfg = config or FitConfig()
    started = time.time()
    y = features.labels
    ids = [r["id"] for r in features.rows]
    split = split_labels(ids, seed=cfg.seed, train_fraction=cfg.train_fraction,
                         calibration_fraction=cfg.calibration_fraction)
    for name in ("train", "calibration", "test"):
        if len(np.unique(y[split == name])) < 2:
            raise ValueError(f"the {name} split has {(split == name).sum()} questions and only one outcome class; "
                             "more (or more varied) data is needed")
    sources = np.asarray([r["dataset"] for r in features.rows])
    answer_end = token_position == ANSWER_END
    if token_position not in (TOKEN_POSITION, ANSWER_END):
        raise ValueError(f"token_position must be {TOKEN_POSITION!r} or {ANSWER_END!r}, got {token_position!r}")
    stack_names = ((ANSWER_STACK_FEATURES if cfg.answer_layout == "v1" else ANSWER_STACK_FEATURES_V2) if answer_end
                   else STACK_FEATURES)
    side = Side.from_answer_rows(features.rows, stack_names) if answer_end else Side.from_rows(features.rows)
    # the prompt-level recipe is unchanged; the answer-level one is monotone, chooses k on mean and min
    monotone = cfg.monotone and answer_end
    k_criterion = cfg.k_criterion if answer_end else "mean"
    loso_baselines = {}
    for name, getter in (ANSWER_BASELINES if answer_end else {}).items():
        vals = getter(features.rows)
        if all(v is not None for v in vals):
            loso_baselines[name] = np.asarray(vals, dtype=np.float64)
    n_layers, width = features.features.shape[1], features.features.shape[2]
    tr, cal, te = split == "train", split == "calibration", split == "test"

    # 1. Layer (and, at the answer's end with answer_read "auto", how the answer is read).
    many_sources = len([s for s in np.unique(sources) if len(np.unique(y[sources == s])) == 2]) >= 2
    scan_result = _scan_layers(features, y, sources, tr, cfg, answer_end=answer_end, many_sources=many_sources,
                               k_criterion=k_criterion)
    answer_read, layer, scan, layer_score, read_scores = scan_result
    feats = (features.answer_read(answer_read) if answer_end else features.features).numpy()
    X = np.asarray(feats[:, layer - 1, :], dtype=np.float64)

    # 2. k, head and the transfer table at that layer.
    study = None
    grid = [k for k in K_GRID if k < width]
    # at the answer's end the dense head competes too (the prompt-level recipe keeps its grid)
    k_grid = tuple(K_GRID) + ((width,) if answer_end and (cfg.max_fraction or 1.0) >= 1.0 else ())
    if many_sources:
        study = loso_study(X, y, sources, side, split, max_fraction=cfg.max_fraction or 1.0, tolerance=cfg.tolerance,
                           heads=cfg.heads, random_draws=cfg.random_draws, seed=cfg.seed, balance=cfg.balance,
                           baselines=loso_baselines, progress=cfg.progress, k_grid=k_grid, stack_names=stack_names,
                           monotone=monotone, k_criterion=k_criterion, free_modes=answer_end and cfg.answer_free_modes)
        k, head = study.k, study.head
    else:
        cap = max(1, int((cfg.max_fraction or 1.0) * width))
        k, head = max([g for g in grid if g <= cap] or [min(grid)]), "linear"

    # 3. The served model, fitted on train (+ calibration), neurons pruned on train rows only.
    weights = balanced_weights(y[tr], sources[tr]) if cfg.balance else None
    neurons = prune_path(X[tr], y[tr], sorted(set(grid) | {k}), seed=cfg.seed, sample_weight=weights)[k]
    modes = study.modes if study is not None else {}
    served = ConfidenceModel(neurons, head=head, seed=cfg.seed, modes=modes, stack_names=stack_names,
                             monotone=monotone).fit(X[tr], y[tr], side[tr], X[cal], y[cal], side[cal],
                                                    sample_weight=weights)
    calibration_choice = _out_of_source_calibration(served, study, cfg.answer_calibration) if (
        answer_end and study is not None) else None
    other_name = next((h for h in cfg.heads if h != head), None)
    other = (ConfidenceModel(neurons, head=other_name, seed=cfg.seed, modes=modes, stack_names=stack_names,
                             monotone=monotone).fit(
        X[tr], y[tr], side[tr], X[cal], y[cal], side[cal], sample_weight=weights) if other_name else None)
    rng = np.random.default_rng(cfg.seed + 1)
    # random sets of the value set's size; of the smallest sparse size when the served head reads the whole layer
    random_k = study.random_k if study is not None and study.random_k else k
    random_sets = [np.sort(rng.choice(width, size=random_k, replace=False)) for _ in range(cfg.random_draws)]

    # The artifact's tensors and readout metadata, written and read back: every served number below (the card's
    # tables, reliability, thresholds) is computed by ValueProbe, the code that serves it.
    tensors = served.artifact_tensors()
    if other is not None:
        tensors.update({f"head.{other.head}.{k_}": v for k_, v in other.head_.head_params().items()})
    if "head.linear.weight" not in tensors:  # every artifact carries a linear head (the fallback readers use)
        linear = ConfidenceModel(neurons, head="linear", seed=cfg.seed).fit(X[tr], y[tr], side[tr], X[cal], y[cal],
                                                                           side[cal])
        tensors.update({f"head.linear.{k_}": v for k_, v in linear.head_.head_params().items()})
    metadata = {
        "model_name": model_name,
        "hidden_size": str(width),
        "layer": str(layer),
        **stamp_metadata(model, tokenizer, layer, prompt_format),
        "token_position": token_position,
        "prompt_format": prompt_format.to_json(),
        "objective": cfg.objective,
        **served.readout_metadata(),
        **({"answer_read": answer_read} if answer_end else {}),
    }
    probe = _written_and_read_back(ArtifactData(tensors, metadata))
    parts = FittedParts(served=probe, other_head=other, dense=LinearProbe().fit(X[tr], y[tr], sample_weight=weights),
                        next_token=NextTokenStack().fit(side[tr], y[tr], side[cal], y[cal]), random_sets=random_sets,
                        random_probes=[LinearProbe().fit(X[tr][:, s], y[tr], sample_weight=weights) for s in random_sets],
                        calibration=SplitData(X[cal], y[cal], side[cal], [r for r, m in zip(features.rows, cal) if m]),
                        served_modes=_served_by_kind(served))

    def subset(mask) -> SplitData:
        return SplitData(X[mask], y[mask], side[mask], [r for r, m in zip(features.rows, mask) if m])

    test = {"all": _evaluate(parts, subset(te))}
    reliability = {}
    test_comp = served_predictions(probe, X[te], side[te])
    for kind in KINDS:
        m = te & (side.kind == kind)
        if len(np.unique(y[m])) == 2:
            test[kind] = _evaluate(parts, subset(m))
            mk = side.kind[te] == kind
            reliability[kind] = reliability_dict(y[te][mk], test_comp["probability"][mk])
    test_by_dataset = {}
    for s in np.unique(sources):
        m = te & (sources == s)
        if len(np.unique(y[m])) == 2:
            test_by_dataset[str(s)] = _evaluate(parts, subset(m))

    # 4. Which score to serve, per the evidence: stacked unless the value probability alone transfers better.
    def mean_of(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    if study is not None:
        served_loso = mean_of(r["served"] for r in study.rows.values())
        value_loso = mean_of(r[f"value_{head}"] for r in study.rows.values())
    else:
        served_loso = value_loso = None
    served_score = probe.served_score
    prob_cal = served_predictions(probe, X[cal], side[cal])["probability"]
    thresholds = {
        "escalation": {f"{r:g}": escalation_threshold(prob_cal, r) for r in cfg.escalation_rates},
        "risk_controlled": {
            f"{a:g}": risk_controlled_threshold(prob_cal, y[cal], alpha=a, delta=cfg.risk_delta).to_dict()
            for a in cfg.risk_alphas
        },
        "source": "calibration split",
    }
    ood_card = _ood_card(served, study, k, test_comp["ood"])
    by_options = (_loso_by_options(features, X, y, sources, side, split, cfg, head=head, k=k,
                                   stack_names=stack_names, monotone=monotone, baselines=loso_baselines)
                  if answer_end and study is not None else {})
    card = {
        "model_name": model_name,
        "token_position": token_position,
        **({"answer_read": answer_read, "read_scan": {r: {str(l_): v for l_, v in sc.items()}
                                                      for r, sc in read_scores.items()},
            "stack_features": list(stack_names), "monotone_stack": monotone,
            "loso_by_options": by_options, "calibration_choice": calibration_choice} if answer_end else {}),
        "served_score": served_score,
        "served_by_kind": _served_by_kind(served),
        "stack_kinds": sorted(served.stack_),
        "stack_dropped": served.dropped_kinds_,
        "head": head,
        "objective": cfg.objective,
        "data": {str(d): {"n": int((sources == d).sum()), "accuracy": float(y[sources == d].mean()),
                          "kind": str(side.kind[sources == d][0])} for d in np.unique(sources)},
        "splits": {"seed": cfg.seed, "n_train": int(tr.sum()), "n_calibration": int(cal.sum()), "n_test": int(te.sum()),
                   "fractions": [cfg.train_fraction, cfg.calibration_fraction,
                                 round(1 - cfg.train_fraction - cfg.calibration_fraction, 6)],
                   "n_test_by_kind": {kind: int((te & (side.kind == kind)).sum()) for kind in KINDS}},
        "selection": {"layer": int(layer), "n_layers": n_layers, "k": int(k), "width": width, "fraction": k / width,
                      "criterion": "leave-one-source-out AUROC" if many_sources else "pooled CV AUROC (one source)",
                      "layer_scores": {str(l): v for l, v in layer_score.items()},
                      "layer_scan": {str(l): v for l, v in scan.items()},
                      "k_curve": ({str(kk): v for kk, v in study.k_curve.items()} if study else {}),
                      "heads": (study.heads if study else {}), "tolerance": cfg.tolerance,
                      "max_fraction": cfg.max_fraction},
        "loso": ({"rows": study.rows, "served_mean": served_loso, "value_mean": value_loso, "nested_mode": True}
                 if study else {}),
        "test": test,
        "test_by_dataset": test_by_dataset,
        "reliability": reliability,
        "ood": ood_card,
        "config": {k_: v for k_, v in asdict(cfg).items() if k_ not in ("progress",)},
        "fit_seconds": round(time.time() - started, 1),
    }
    card["verdict"] = _verdict(card)

    metadata["thresholds"] = json.dumps(thresholds, sort_keys=True)
    metadata["eval_card"] = json.dumps(card, sort_keys=True, default=_json_default)
    return ArtifactData(tensors, metadata), card


def _served_by_kind(served: ConfidenceModel) -> dict[str, str]:
    """Per kind, the served mode; a kind whose stacker could not be fitted serves the value neurons."""
    return {kind: (served.modes[kind] if kind in served.stack_ or served.modes[kind] == "value"
                   else "value (no stacker)") for kind in KINDS}


def _scan_layers(features: FeatureSet, y, sources, tr, cfg: FitConfig, *, answer_end: bool, many_sources: bool,
                 k_criterion: str):
    """The dense probe's layer scan, leave-one-source-out (pooled CV when there is a single source), on each read
    the config allows (at the answer's end with ``answer_read="auto"``: the last token and the answer's mean).
    Returns ``(read, layer, scan, layer_scores, scores_by_read)`` for the best read and layer; at the answer's end
    a layer is scored by the average of the mean and the minimum over left-out sources (even transfer)."""
    layers = cfg.layers or _candidate_layers(features.features.shape[1])
    reads = (("last", "mean") if cfg.answer_read == "auto" else (cfg.answer_read,)) if answer_end else ("last",)
    read_scans, read_scores = {}, {}
    for read in reads:
        feats = (features.answer_read(read) if answer_end else features.features).numpy()
        if many_sources:
            scan = loso_layer_scan(feats, y, sources, tr, layers, balance=cfg.balance, progress=cfg.progress)
            score = {}
            for l_, per in scan.items():
                values = [v for v in per.values() if v is not None]
                score[l_] = (float(np.mean(values) + np.min(values)) / 2 if k_criterion == "mean+min"
                             else float(np.mean(values)))
        else:
            scan = {}
            score = {l_: cv_auroc(np.asarray(feats[tr][:, l_ - 1, :], dtype=np.float64), y[tr], seed=cfg.seed)
                     for l_ in layers}
        read_scans[read], read_scores[read] = scan, score
    read, layer = max(((r, l_) for r in reads for l_ in read_scores[r]), key=lambda rl: read_scores[rl[0]][rl[1]])
    return read, layer, read_scans[read], read_scores[read], read_scores


def _ood_card(served: ConfidenceModel, study, k: int, test_flags: np.ndarray) -> dict:
    """The card's OOD entry: threshold, share of the test split flagged and, with a leave-one-source-out study,
    how well the distance flags a left-out source and the left-out ECE of flagged and unflagged questions."""
    card = {"threshold": served.ood_threshold_, "quantile": served.ood_quantile, "space": f"{k} value neurons",
            "test_flagged": float(test_flags.mean())}
    if study is not None:
        card["loso_auroc"] = {s: r.get("ood_auroc") for s, r in study.rows.items()}
        flagged = np.concatenate([p["ood"] for p in study.predictions.values()])
        ys = np.concatenate([p["y"] for p in study.predictions.values()])
        ps = np.concatenate([p["probability"] for p in study.predictions.values()])
        for name, m in (("flagged", flagged), ("not_flagged", ~flagged)):
            if m.sum() >= 20:
                card[f"loso_ece_{name}"] = score_metrics(ys[m], ps[m], ps[m])["ece_equal_mass"]
                card[f"loso_n_{name}"] = int(m.sum())
    return card


def _loso_by_options(features: FeatureSet, X, y, sources, side: Side, split, cfg: FitConfig, *, head: str, k: int,
                     stack_names, monotone: bool, baselines: dict) -> dict:
    """Calibration across option counts: multiple choice grouped by how many options a question shows, each count
    (with at least 50 questions) left out in turn, fitted on the others at the chosen layer, k and head, so the
    chance level the stack reads (log options) is tested where it must extrapolate. Empty with fewer than two
    such counts."""
    counts = np.array([int(r.get("n_options", 0)) for r in features.rows])
    choice = side.kind == "choice"
    common = [c for c in np.unique(counts[choice]) if (choice & (counts == c)).sum() >= 50]
    if len(common) < 2:
        return {}
    m = choice & np.isin(counts, common)
    groups = np.array([f"{c} options" for c in counts])
    opt = loso_study(X[m], y[m], groups[m], side[m], split[m], max_fraction=1.0, tolerance=cfg.tolerance,
                     heads=(head,), random_draws=0, seed=cfg.seed, balance=cfg.balance,
                     baselines={n_: v[m] for n_, v in baselines.items()}, progress=cfg.progress,
                     k_grid=(k,), stack_names=stack_names, monotone=monotone, free_modes=True)
    return {"rows": opt.rows, "modes": opt.modes,
            "sources": {g: sorted({str(d) for d in sources[m & (groups == g)]}) for g in opt.rows}}


def _out_of_source_calibration(served: ConfidenceModel, study, choice: str) -> dict:
    """Per kind, Platt on the leave-one-source-out predictions of the mode the kind serves (each source predicted
    by models that never saw it), composed after the stacker's own Platt when ``choice`` says so (``auto``: when
    its cross-fitted ECE over left-out sources is lower on average than the calibration split's). The study's
    rows then report, as ``served_ece``, the ECE of the calibration the artifact serves."""
    from valueprobe.plugin.readout import compose_maps

    from .transfer import out_of_source_platt

    rows = study.rows
    split_ece = [r["served_ece"] for r in rows.values() if r.get("served_ece") is not None]
    cross_ece = [r["served_ece_cross_fitted"] for r in rows.values() if r.get("served_ece_cross_fitted") is not None]
    maps = {}
    for kind, mode in study.modes.items():
        sources = [s for s, r in rows.items() if r["kind"] == kind
                   and mode in study.predictions.get(s, {}).get("by_mode", {})]
        if kind in served.stack_ and mode != "value" and len(sources) >= 2:
            a2, b2 = out_of_source_platt([study.predictions[s]["by_mode"][mode] for s in sources],
                                         [study.predictions[s]["y"] for s in sources])
            if a2 > 0:  # a map that inverts the ranking is no calibration: that kind keeps the split's
                maps[kind] = (a2, b2)
    use = bool(maps) and (choice == "out_of_source" or (
        choice == "auto" and cross_ece and split_ece and np.mean(cross_ece) < np.mean(split_ece)))
    if use:
        for kind, (a2, b2) in maps.items():
            params = served.stack_[kind]
            a, b = compose_maps((a2, b2), (float(params["calibrator.a"][0]), float(params["calibrator.b"][0])))
            params["calibrator.a"], params["calibrator.b"] = np.array([a]), np.array([b])
        for r in rows.values():
            if r["kind"] in maps and r.get("served_ece_cross_fitted") is not None:  # kinds served with the map
                r["served_ece_split"] = r.get("served_ece")
                r["served_ece"] = r["served_ece_cross_fitted"]
    return {"choice": choice, "used": "out_of_source" if use else "split",
            "split_ece_mean": float(np.mean(split_ece)) if split_ece else None,
            "out_of_source_ece_mean": float(np.mean(cross_ece)) if cross_ece else None,
            "maps": {k: list(v) for k, v in maps.items()}}


def _written_and_read_back(data: ArtifactData) -> ValueProbe:
    """``data`` saved to a file and loaded as the sidecar loads it (validation, dtypes and all)."""
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/artifact.safetensors"
        save_artifact(ArtifactData(dict(data.tensors), dict(data.metadata)), path)
        return ValueProbe(load_artifact(path))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _verdict(card: dict) -> str:
    """Plain sentences on the targets: transfer, free-baseline margin, calibration per kind, sparsity."""
    out = []
    loso = card.get("loso", {}).get("rows", {})
    answer_end = card.get("token_position") == ANSWER_END
    floor = 0.78 if answer_end else 0.72
    if loso:
        served = {s: r.get("served") for s, r in loso.items()}
        worst = min((v for v in served.values() if v is not None), default=None)
        meeting = sum(1 for v in served.values() if v is not None and v >= floor)
        out.append(f"Leave-one-source-out AUROC of the served score: min {worst:.3f}; ≥ {floor} on {meeting} of "
                   f"{len(served)} left-out sources (target: all).")
        for kind in KINDS:
            rows = [r for r in loso.values() if r["kind"] == kind]
            if not rows:
                continue
            if answer_end:
                # the best free answer-side signal per source: sequence log-probability (mean or sum), the
                # minimum token log-probability, or the prompt's max-softmax
                free = ("baseline:answer mean token log-prob", "baseline:answer sum log-prob",
                        "baseline:answer min token log-prob", "baseline:prompt max-softmax")
                best = [max((r[c] for c in free if r.get(c) is not None), default=0.5) for r in rows]
                gain = np.mean([r["served"] - b for r, b in zip(rows, best)])
                below = sum(1 for r, b in zip(rows, best) if r["served"] is not None and r["served"] < b)
                out.append(f"{kind}: serves {card['served_by_kind'].get(kind)}; served − best free answer-side "
                           f"baseline = {gain:+.3f} AUROC (mean over left-out sources; target +0.03); below the "
                           f"best free signal of the left-out source on {below} of {len(rows)} (target 0).")
            else:
                gain = np.mean([r["served"] - r["max_softmax"] for r in rows])
                out.append(f"{kind}: serves {card['served_by_kind'].get(kind)}; served − max-softmax = {gain:+.3f} AUROC (mean "
                           "over left-out sources; target +0.02).")
        eces = [r["served_ece"] for r in loso.values() if r.get("served_ece") is not None]
        if eces:
            out.append(f"ECE (equal mass) of the served probability on left-out sources: max {max(eces):.3f}, mean "
                       f"{np.mean(eces):.3f}; ≤ 0.08 on {sum(e <= 0.08 for e in eces)} of {len(eces)} (target: all).")
        cc = card.get("calibration_choice") or {}
        if cc.get("split_ece_mean") is not None and cc.get("out_of_source_ece_mean") is not None:
            out.append(f"Calibration served: {cc['used']} (mean ECE over left-out sources {cc['split_ece_mean']:.3f} "
                       f"with Platt on the calibration split, {cc['out_of_source_ece_mean']:.3f} with Platt on the "
                       "other sources' left-out predictions, cross-fitted).")
        by_options = card.get("loso_by_options", {}).get("rows", {})
        if by_options:
            out.append("Left-out option count (multiple choice): " + "; ".join(
                f"{g}: served AUROC {r['served']:.3f}, ECE {r['served_ece']:.3f}" for g, r in by_options.items()
                if r.get("served") is not None and r.get("served_ece") is not None) + " (target ECE ≤ 0.08).")
        dense = np.mean([r["dense"] for r in loso.values() if r["dense"] is not None])
        sparse_k = next((r.get("random_k") for r in loso.values() if r.get("random_k")), card["selection"]["k"])
        value = np.mean([r.get("sparse_value", r.get("value_linear")) for r in loso.values()
                         if r.get("sparse_value", r.get("value_linear")) is not None])
        rand_values = [r["random_mean"] for r in loso.values() if r.get("random_mean") is not None]
        rand = np.mean(rand_values) if rand_values else float("nan")
        sparse_ok = value >= dense - 0.02 and value >= rand + 0.05
        if sparse_k != card["selection"]["k"]:
            out.append(f"The served head reads all {card['selection']['k']} units of the layer (dense won on the "
                       "leave-one-source-out criterion).")
        out.append(f"Sparse set (k={sparse_k}, {100 * sparse_k / card['selection']['width']:.2f}% of the width), "
                   f"leave-one-source-out: value neurons {value:.3f}, dense {dense:.3f}, random-k mean {rand:.3f} → "
                   + ("the sparse set earns its name." if sparse_ok else
                      "this model shows NO clear sparse advantage (needs within 0.02 of dense and ≥ 0.05 over random)."))
    for kind in KINDS:
        rows = card["test"].get(kind)
        if rows:
            r = rows[0]
            out.append(f"Test split, {kind}: n={r['n']}, served AUROC {r['auroc']:.3f}, ECE (equal mass) "
                       f"{r['ece_equal_mass']:.3f}, Brier {r['brier']:.3f}.")
    return " ".join(out)
