"""Confidence that transfers: the served model (value neurons + next-token stack, per kind, with an OOD flag)
and the leave-one-source-out study that chooses and judges it.

Pooled AUROC over sources with different base rates rewards features that say *which data set* a question comes
from. Everything chosen here (layer, k, neurons, head) is chosen by leave-one-source-out AUROC instead: fit on
every source but one, score the one left out, and the neurons of each fold are pruned on that fold's fitting rows
only, so no number reuses neurons chosen with the target source's rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import expit
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from valueprobe.plugin.nexttoken import KINDS
from valueprobe.plugin.readout import (ANSWER_STACK_FEATURES, STACK_FEATURES, answer_columns, clipped_logit,
                                       mahalanobis, stack_features, stack_logit, stack_proba, summary_columns)

from .calibrators import PlattCalibrator
from .metrics import auroc_score, brier_loss, expected_calibration_error
from .probes import LinearProbe, MLPProbe

__all__ = ["Side", "cv_auroc", "prune_path", "KindStacker", "ConfidenceModel", "loso_layer_scan", "loso_study", "K_GRID"]

K_GRID = (768, 384, 192, 96, 48, 32, 24, 16, 12, 8, 4)


@dataclass
class Side:
    """Per-question side information: the free signal of the same forward pass and the question kind.

    At the prompt's end (:meth:`from_rows`) the free signal is the next-token distribution: ``max_softmax`` and
    ``entropy``. At the answer's end (:meth:`from_answer_rows`) ``extra`` adds the answer's own token
    log-probabilities (:func:`~valueprobe.plugin.readout.answer_signals`: their sum and minimum), so the stacker,
    the study and the artifact are the same code at both positions."""

    max_softmax: np.ndarray
    entropy: np.ndarray
    kind: np.ndarray  # "choice" | "open"
    extra: np.ndarray | None = None  # [n, m] further free columns of the stack (the answer's log-probabilities)

    def stack_inputs(self, value_raw, mask=None) -> np.ndarray:
        """The stacker's input rows (``mask`` selects rows of this side)."""
        sel = slice(None) if mask is None else mask
        return stack_features(value_raw, self.max_softmax[sel], self.entropy[sel],
                              None if self.extra is None else self.extra[sel])

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Side:
        return cls(np.array([r["max_softmax"] for r in rows], dtype=np.float64),
                   np.array([r["option_entropy"] for r in rows], dtype=np.float64),
                   np.array(["choice" if r["kind"] == "choice" else "open" for r in rows]))

    @classmethod
    def from_answer_rows(cls, rows: list[dict], names=ANSWER_STACK_FEATURES) -> Side:
        """From answer-end extraction rows (``token_logprobs``, or ``answer_sum_logprob`` / ``answer_min_logprob``
        / ``answer_mean_logprob`` in older caches, and ``n_options``; see
        :func:`~valueprobe.calibration.extract.extract_features`): the extra columns ``names[3:]`` of the stack
        layout ``names`` (the artifact's ``stack_features``), computed as the server computes them
        (:func:`~valueprobe.plugin.readout.answer_columns`)."""
        extra_names = tuple(names)[3:]

        def signals(r):
            options = r.get("n_options", 0) if r["kind"] == "choice" else 0
            if "token_logprobs" in r or not r.get("answer_tokens"):
                return answer_columns(extra_names, r.get("token_logprobs") or [], options)
            return summary_columns(extra_names, r["answer_sum_logprob"], r["answer_min_logprob"],
                                   r["answer_mean_logprob"], options)

        prompt = cls.from_rows(rows)
        prompt.extra = np.array([signals(r) for r in rows], dtype=np.float64).reshape(-1, len(extra_names))
        return prompt

    def __getitem__(self, mask) -> Side:
        return Side(self.max_softmax[mask], self.entropy[mask], self.kind[mask],
                    None if self.extra is None else self.extra[mask])


def _auroc(y, s):
    y = np.asarray(y)
    return auroc_score(y, s) if len(np.unique(y)) == 2 else None


def balanced_weights(y, sources) -> np.ndarray:
    """Sample weights under which every source has the same total weight and, inside each source, right and
    wrong answers weigh the same. Then "which data set is this" carries no information about the label, so a
    probe gains nothing from neurons that encode the source (pooled base rates of 0.8 / 0.5 / 0.1 would
    otherwise reward exactly those), and what it learns is the within-source signal that can transfer. Base
    rates come back afterwards through the per-kind calibration."""
    y, sources = np.asarray(y), np.asarray(sources)
    w = np.zeros(len(y), dtype=np.float64)
    names = np.unique(sources)
    for s in names:
        m = sources == s
        for label in (0, 1):
            cell = m & (y == label)
            if cell.any():
                w[cell] = 1.0 / (len(names) * (2 if len(np.unique(y[m])) == 2 else 1) * cell.sum())
    return w * len(y)


def cv_auroc(X, y, *, folds: int = 3, seed: int = 0) -> float:
    """Mean out-of-fold AUROC of a linear probe (stratified folds, fixed seed): the layer criterion when there is a
    single source, so nothing can be left out."""
    y = np.asarray(y)
    oof = np.zeros(len(y))
    for train, val in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        oof[val] = LinearProbe(C=0.05, random_state=seed).fit(X[train], y[train]).decision_function(X[val])
    return auroc_score(y, oof)


def prune_path(X, y, sizes=K_GRID, *, seed: int = 0, sample_weight=None) -> dict[int, np.ndarray]:
    """Iterative magnitude pruning: refit a linear probe, keep the top-k by |weight|, for each k in ``sizes``
    (descending), starting from every column of ``X``. Returns ``{k: sorted column indices}``."""
    current = np.arange(X.shape[1])
    out = {}
    for k in sorted(sizes, reverse=True):
        if k < len(current):
            w = LinearProbe(random_state=seed).fit(X[:, current], y, sample_weight=sample_weight).neuron_importance_
            current = np.sort(current[np.argsort(-w, kind="mergesort")[:k]])
        out[int(k)] = current
    return out


def _make_head(kind: str, seed: int):
    if kind == "linear":
        return LinearProbe(random_state=seed)
    if kind == "mlp":
        return MLPProbe(seed=seed, epochs=40)
    raise ValueError(f"unknown head {kind!r}")


#: stack columns whose larger value never means less confidence. A monotone stacker drops one whose fitted weight
#: comes out negative and refits the rest, so that on a source unlike the fitting data the stack can only lean
#: on these signals the way they point, and degrades toward them instead of below them (issue 31).
MONOTONE_COLUMNS = ("value_raw", "logit_max_softmax", "answer_sum_logprob", "answer_min_logprob", "answer_mean_logprob")
#: ... and those whose larger value never means more confidence (the prompt's next-token entropy)
ANTITONE_COLUMNS = ("entropy",)


class KindStacker:
    """One question kind's stacker: logistic regression on the stacking columns ``names`` (default
    :data:`~valueprobe.plugin.readout.STACK_FEATURES`: ``[value logit, logit(max-softmax), entropy]``; see
    :func:`~valueprobe.plugin.readout.stack_features`), then Platt on the calibration rows.

    ``value_weight=False`` leaves the value logit out (weight 0: the free signals alone). ``only``: one column
    name, the rest weight 0 (one free signal served alone, Platt-calibrated). ``monotone``: a column of
    :data:`MONOTONE_COLUMNS` whose weight comes out negative is dropped and the rest refitted. ``params_`` are the
    artifact's ``stack.<kind>.*`` arrays (a dropped column: weight 0, mean 0, scale 1); ``predict_proba`` is the
    serving function on them; ``used_`` names the columns kept. ``inverted_``: the Platt slope on the calibration
    rows is not positive (the stacker ranks them backwards)."""

    def __init__(self, *, value_weight: bool = True, seed: int = 0, C: float = 1.0, names=None,
                 monotone: bool = False, only: str | None = None):
        self.value_weight, self.seed, self.C = value_weight, seed, C
        self.names, self.monotone, self.only = names, monotone, only

    def fit(self, features, y, features_cal, y_cal) -> KindStacker:
        features = np.asarray(features, dtype=np.float64)
        n = features.shape[1]
        names = list(self.names or STACK_FEATURES)[:n]
        use = [names.index(self.only)] if self.only else list(range(0 if self.value_weight else 1, n))
        while True:
            lr = LinearProbe(C=self.C, random_state=self.seed).fit(features[:, use], y)
            bad = [c for c, w in zip(use, lr.coef_) if self.monotone and (
                (names[c] in MONOTONE_COLUMNS and w < 0) or (names[c] in ANTITONE_COLUMNS and w > 0))]
            if not bad:
                break
            use = [c for c in use if c not in bad]
            if not use:  # every column points the wrong way: no signal to serve but the base rate
                break
        mean, scale, weight = np.zeros(n), np.ones(n), np.zeros(n)
        if use:
            mean[use], scale[use], weight[use] = lr.standardizer_.mean_, lr.standardizer_.scale_, lr.coef_
            bias = float(lr.intercept_)
        else:
            rate = float(np.clip(np.mean(y), 1e-3, 1 - 1e-3))
            bias = float(np.log(rate / (1 - rate)))
        params = {"mean": mean, "scale": scale, "weight": weight, "bias": np.array([bias])}
        self.used_ = [names[c] for c in use]
        platt = PlattCalibrator().fit(stack_logit(params, features_cal), y_cal)
        self.slope_ = float(platt.a_)
        self.inverted_ = platt.a_ <= 0
        params["calibrator.a"], params["calibrator.b"] = np.array([platt.a_]), np.array([platt.b_])
        self.params_ = params
        return self

    def decision_function(self, features) -> np.ndarray:
        """The stacker's logit before Platt (what a ranking, or a second calibration, needs)."""
        return stack_logit(self.params_, features)

    def predict_proba(self, features) -> np.ndarray:
        return stack_proba(self.params_, features)


def _stacker_for(mode: str, *, seed: int, names, monotone: bool) -> KindStacker:
    """The stacker a served mode needs: ``stacked`` (value logit + free columns), ``next_token`` (the free
    columns alone) or ``free:<column>`` (that free column alone)."""
    return KindStacker(value_weight=mode != "next_token", seed=seed, names=names, monotone=monotone,
                       only=mode.split(":", 1)[1] if mode.startswith("free:") else None)


class ConfidenceModel:
    """The served confidence, fitted from one layer's states.

    * value head (``linear`` or ``mlp``) on the ``neurons`` of the layer, fitted on the training rows, with a
      Platt calibrator on the calibration rows (the ``value`` component);
    * per question kind, a logistic stacker on ``[value logit, logit(max-softmax), entropy]``, fitted on the
      training rows with *out-of-fold* value logits (so it does not over-trust a head scored on its own training
      rows), then Platt-calibrated on that kind's calibration rows (the ``stacked`` score);
    * an out-of-distribution distance: Mahalanobis (Ledoit-Wolf shrinkage) of the neuron values from the
      training rows, flagged above the ``ood_quantile`` of the calibration rows' distances.
    """

    def __init__(self, neurons, *, head: str = "linear", seed: int = 0, folds: int = 5, ood_quantile: float = 0.99,
                 modes: dict | None = None, stack_names=STACK_FEATURES, monotone: bool = False):
        self.neurons = np.asarray(neurons, dtype=np.int64)
        #: what the stacker's columns are (the artifact's ``stack_features``): next-token signals at the prompt's
        #: end, the answer's token log-probabilities at its end (see :class:`Side`)
        self.stack_names = tuple(stack_names)
        self.head, self.seed, self.folds, self.ood_quantile = head, seed, folds, ood_quantile
        #: per kind, what ``probability`` is: "stacked" (value logit + next-token features), "next_token" (the
        #: free features alone: the value weight is 0), "free:<column>" (one free column alone, Platt-calibrated)
        #: or "value" (the value neurons' calibrated probability)
        self.modes = {kind: "stacked" for kind in KINDS} | dict(modes or {})
        self.monotone = monotone  # see KindStacker

    def fit(self, X, y, side: Side, X_cal, y_cal, side_cal: Side, sample_weight=None, groups=None) -> ConfidenceModel:
        """``sample_weight`` (e.g. :func:`balanced_weights`) weighs the value head's training rows only.

        ``groups`` (the source of each training row): the stacker's value-logit input is then computed
        leave-one-source-out, so the stacker learns how far to trust the value neurons *on a source the head
        has not seen*, which is how it will be used; without groups, plain stratified folds."""
        y, y_cal = np.asarray(y), np.asarray(y_cal)
        Xk, Xk_cal = X[:, self.neurons], X_cal[:, self.neurons]
        sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.head_ = _make_head(self.head, self.seed).fit(Xk, y, sample_weight=sw)
        oof = np.zeros(len(y))
        if groups is not None and len(np.unique(groups)) >= 3:
            groups = np.asarray(groups)
            folds = [(np.flatnonzero(groups != g), np.flatnonzero(groups == g)) for g in np.unique(groups)]
        else:
            folds = list(StratifiedKFold(self.folds, shuffle=True, random_state=self.seed).split(Xk, y))
        for tr, va in folds:
            if len(np.unique(y[tr])) < 2:
                continue
            oof[va] = _make_head(self.head, self.seed).fit(
                Xk[tr], y[tr], sample_weight=None if sw is None else sw[tr]).decision_function(Xk[va])
        raw_cal = self.head_.decision_function(Xk_cal)
        self.value_calibrator_ = PlattCalibrator().fit(raw_cal, y_cal)
        if self.value_calibrator_.a_ <= 0:
            # The head ranks the calibration rows backwards: it carries no usable signal, so serve the base rate
            # (a slope of ~0) rather than an inverted confidence.
            base = float(np.clip(y_cal.mean(), 1e-3, 1 - 1e-3))
            self.value_calibrator_.a_, self.value_calibrator_.b_ = 1e-6, float(np.log(base / (1 - base)))
        self.dropped_kinds_: dict[str, str] = {}
        self.stack_: dict[str, dict[str, np.ndarray]] = {}
        for kind in KINDS:
            m, mc = side.kind == kind, side_cal.kind == kind
            if self.modes[kind] == "value" or len(np.unique(y[m])) < 2 or len(np.unique(y_cal[mc])) < 2:
                continue
            stacker = _stacker_for(self.modes[kind], seed=self.seed, names=self.stack_names,
                                   monotone=self.monotone).fit(
                side.stack_inputs(oof[m], m), y[m], side_cal.stack_inputs(raw_cal[mc], mc), y_cal[mc])
            if stacker.inverted_:
                # Stacker inverted on the calibration rows: that kind is served by the value probability.
                self.dropped_kinds_[kind] = f"stacker's Platt slope {stacker.slope_:.3g} <= 0 on the calibration split"
                continue
            self.stack_[kind] = stacker.params_
        lw = LedoitWolf().fit(Xk)
        self.ood_mean_, self.ood_precision_ = lw.location_, lw.precision_
        self.ood_threshold_ = float(np.quantile(mahalanobis(Xk_cal, self.ood_mean_, self.ood_precision_),
                                                self.ood_quantile))
        self.probe_ = None  # built from these parameters at the first prediction
        return self

    # -- the fitted model as the artifact holds it, read back by the serving code ---------------------------------
    @property
    def served_score(self) -> str:
        """``stacked`` when some kind has a stacker, else ``value``: the artifact's ``served_score``."""
        return "stacked" if self.stack_ else "value"

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted pieces under the artifact's tensor names: neurons, the head's standardiser and parameters,
        the value calibrator, the per-kind stackers and the OOD model."""
        tensors = {
            "neurons.indices": torch.as_tensor(self.neurons, dtype=torch.int64),
            "features.mean": torch.tensor(self.head_.standardizer_.mean_, dtype=torch.float32),
            "features.scale": torch.tensor(self.head_.standardizer_.scale_, dtype=torch.float32),
            **{f"head.{self.head}.{name}": v for name, v in self.head_.head_params().items()},
            "calibrator.a": torch.tensor([self.value_calibrator_.a_], dtype=torch.float64),
            "calibrator.b": torch.tensor([self.value_calibrator_.b_], dtype=torch.float64),
            "ood.mean": torch.tensor(self.ood_mean_, dtype=torch.float64),
            "ood.precision": torch.tensor(self.ood_precision_, dtype=torch.float64),
            "ood.threshold": torch.tensor([self.ood_threshold_], dtype=torch.float64),
        }
        for kind, params in self.stack_.items():
            tensors.update({f"stack.{kind}.{name}": torch.tensor(np.asarray(v, dtype=np.float64).reshape(-1))
                            for name, v in params.items()})
        return tensors

    def readout_metadata(self) -> dict[str, str]:
        """The artifact's metadata fields that say how these tensors are read."""
        return {
            "head": self.head,
            "calibrator": "platt",
            "served_score": self.served_score,
            "stack_kinds": json.dumps(sorted(self.stack_)),
            "served_by_kind": json.dumps({kind: self.modes[kind] if kind in self.stack_ else "value" for kind in KINDS}),
            "stack_features": json.dumps(list(self.stack_names)),
        }

    def as_probe(self, width: int):
        """This model as a :class:`~valueprobe.plugin.ValueProbe` (no fingerprint: for predictions only), so that
        every number fitting reports comes from the serving code path."""
        from valueprobe.plugin.artifact import ArtifactData
        from valueprobe.plugin.probe import ValueProbe
        from valueprobe.plugin.prompting import PromptFormat

        metadata = {"model_name": "(being fitted)", "layer": "1", "hidden_size": str(width),
                    "prompt_format": PromptFormat().to_json(), **self.readout_metadata()}
        return ValueProbe(ArtifactData(self.artifact_tensors(), metadata))

    def components(self, X, side: Side) -> dict[str, np.ndarray]:
        """Every served number per row, computed by :meth:`ValueProbe.predict` (the serving code): ``value_raw``,
        ``value_probability``, ``probability`` (the stacked score of the row's kind; the value probability where
        that kind has no stacker), ``ood_distance``, ``ood``."""
        if getattr(self, "probe_", None) is None:
            self.probe_ = self.as_probe(X.shape[1])
        return self.probe_.predict(X[:, self.neurons], side.max_softmax, side.entropy, side.kind, extra=side.extra)


class NextTokenStack:
    """The free baseline done as well as the served score: per kind, logistic regression on
    ``[logit(max-softmax), entropy]`` plus Platt on the calibration rows. If the value neurons add nothing, the
    served score cannot beat this."""

    def fit(self, side: Side, y, side_cal: Side, y_cal) -> NextTokenStack:
        y, y_cal = np.asarray(y), np.asarray(y_cal)
        self.models_ = {}
        for kind in KINDS:
            m, mc = side.kind == kind, side_cal.kind == kind
            if len(np.unique(y[m])) < 2 or len(np.unique(y_cal[mc])) < 2:
                continue
            lr = LinearProbe(C=1.0).fit(side.stack_inputs(np.zeros(m.sum()), m)[:, 1:], y[m])
            f_cal = side_cal.stack_inputs(np.zeros(mc.sum()), mc)[:, 1:]
            self.models_[kind] = (lr, PlattCalibrator().fit(lr.decision_function(f_cal), y_cal[mc]))
        return self

    def predict_proba(self, side: Side) -> np.ndarray:
        out = np.full(len(side.kind), np.nan)
        for kind, (lr, platt) in self.models_.items():
            m = side.kind == kind
            if m.any():
                f = side.stack_inputs(np.zeros(m.sum()), m)[:, 1:]
                out[m] = platt.predict_proba(lr.decision_function(f))
        return out


def _ece(y, p):
    return expected_calibration_error(y, p, n_bins=10, strategy="quantile") if len(y) else None


def loso_layer_scan(features, y, sources, fit_mask, layers, *, balance: bool = True,
                    progress: bool = True) -> dict[int, dict[str, float]]:
    """Dense linear probe per layer, leave-one-source-out: ``{layer: {source: AUROC on the left-out source}}``.
    ``features`` is ``[n, n_layers, width]``; only ``fit_mask`` rows of the other sources are fitted on."""
    out = {}
    names = [s for s in np.unique(sources) if len(np.unique(y[sources == s])) == 2]
    for layer in tqdm(layers, desc="LOSO layer scan", disable=not progress):
        X = np.asarray(features[:, layer - 1, :], dtype=np.float64)
        out[int(layer)] = {}
        for s in names:
            fit = fit_mask & (sources != s)
            sw = balanced_weights(y[fit], sources[fit]) if balance else None
            probe = LinearProbe().fit(X[fit], y[fit], sample_weight=sw)
            out[int(layer)][str(s)] = _auroc(y[sources == s], probe.decision_function(X[sources == s]))
    return out


@dataclass
class LosoStudy:
    """Results of :func:`loso_study` (all AUROCs on the left-out source, fitted without it)."""

    k_curve: dict = field(default_factory=dict)        # {k: {source: auroc}} value neurons, linear head
    dense: dict = field(default_factory=dict)          # {source: auroc}
    k: int = 0
    head: str = "linear"
    heads: dict = field(default_factory=dict)          # {head: {source: stacked auroc}}
    rows: dict = field(default_factory=dict)           # {source: {metric: value}}
    predictions: dict = field(default_factory=dict)    # {source: {"y", "probability", "ood"}}
    modes: dict = field(default_factory=dict)          # {kind: "stacked" | "next_token" | "value" | "free:<col>"}
    random_k: int = 0                                  # size of the random sets (k, or the smallest k when k = width)


def loso_study(X, y, sources, side: Side, split, *, max_fraction: float = 0.01, tolerance: float = 0.01,
               heads=("linear", "mlp"), random_draws: int = 100, seed: int = 0, k_grid=K_GRID,
               balance: bool = True, group_stacking: bool = False, baselines: dict | None = None,
               progress: bool = True, stack_names=STACK_FEATURES, monotone: bool = False,
               k_criterion: str = "mean", free_modes: bool = False) -> LosoStudy:
    """Leave-one-source-out at one layer (``X`` is ``[n, width]``): choose k and head, and measure the served
    score, its parts and its baselines on every left-out source.

    For each source s, the fitting rows are the other sources' ``train`` rows and the calibration rows the other
    sources' ``calibration`` rows; the neurons are pruned on those fitting rows only; every row of s is scored.
    ``baselines`` (name -> a score per row, higher = more confident) adds each one's AUROC on every left-out
    source as ``baseline:<name>``.

    ``stack_names`` / ``monotone``: the stacker's columns and constraint (see :class:`KindStacker`; a monotone
    study also scores the ``next_token`` mode as the monotone stacker it serves); with ``free_modes`` each free
    column of :data:`MONOTONE_COLUMNS` is also a candidate served alone (mode ``free:<column>``). ``k_criterion``:
    ``mean`` (mean AUROC over left-out sources) or ``mean+min`` (the average of mean and minimum: a k that
    transfers evenly). Per kind the served mode is the candidate with the best mean over that kind's left-out
    sources (``modes``, what the artifact serves); each row's ``served`` is the mode chosen *without* that row's
    source (the best mean over the kind's other sources): a nested choice, so the column is not picked on the
    number it reports.
    """
    width = X.shape[1]
    names = [str(s) for s in np.unique(sources) if len(np.unique(y[sources == s])) == 2]
    study = LosoStudy()
    paths, weights = {}, {}
    grid = [k for k in k_grid if k <= width] or [max(1, width // 2)]
    for s in tqdm(names, desc="LOSO pruning", disable=not progress):
        fit = (split == "train") & (sources != s)
        target = sources == s
        sw = balanced_weights(y[fit], sources[fit]) if balance else None
        weights[s] = sw
        paths[s] = prune_path(X[fit], y[fit], grid, seed=seed, sample_weight=sw)
        study.dense[s] = _auroc(y[target], LinearProbe().fit(X[fit], y[fit], sample_weight=sw).decision_function(X[target]))
        for k, neurons in paths[s].items():
            p = LinearProbe().fit(X[fit][:, neurons], y[fit], sample_weight=sw)
            study.k_curve.setdefault(k, {})[s] = _auroc(y[target], p.decision_function(X[target][:, neurons]))
    mean_k = {k: float(np.mean([v for v in per.values() if v is not None])) for k, per in study.k_curve.items()}
    if k_criterion == "mean+min":
        mean_k = {k: (m + float(np.min([v for v in study.k_curve[k].values() if v is not None]))) / 2
                  for k, m in mean_k.items()}
    cap = max(1, int(max_fraction * width)) if max_fraction else width
    allowed = [k for k in mean_k if k <= cap] or [min(mean_k)]
    best = max(mean_k[k] for k in allowed)
    study.k = int(min(k for k in allowed if mean_k[k] >= best - tolerance))

    rng = np.random.default_rng(seed)
    # random sets of the chosen size; when the chosen set is the whole layer (dense), of the smallest sparse size
    # instead, compared with the value neurons of that size (the sparse track stays on the card either way)
    study.random_k = study.k if study.k < width else min(k for k in study.k_curve if k < width) if len(study.k_curve) > 1 else study.k
    draws = [np.sort(rng.choice(width, size=study.random_k, replace=False)) for _ in range(random_draws)
             ] if study.random_k < width else []
    free_modes = [f"free:{n}" for n in list(stack_names)[1:] if n in MONOTONE_COLUMNS] if free_modes else []
    by_head: dict[str, dict[str, dict]] = {}  # source -> head -> {mode: probabilities} (out-of-source calibration)
    for s in tqdm(names, desc="LOSO served score", disable=not progress):
        fit, cal, target = (split == "train") & (sources != s), (split == "calibration") & (sources != s), sources == s
        neurons = paths[s][study.k]
        yt = y[target]
        row = {"n": int(target.sum()), "accuracy": float(yt.mean()), "kind": str(side.kind[target][0])}
        for head in heads:
            model = ConfidenceModel(neurons, head=head, seed=seed, stack_names=stack_names, monotone=monotone).fit(
                X[fit], y[fit], side[fit], X[cal], y[cal], side[cal], sample_weight=weights[s],
                groups=sources[fit] if group_stacking else None)
            comp = model.components(X[target], side[target])
            by_head.setdefault(s, {})[head] = {"stacked": comp["probability"], "value": comp["value_probability"]}
            study.heads.setdefault(head, {})[s] = _auroc(yt, comp["probability"])
            row[f"served_{head}"] = study.heads[head][s]
            row[f"value_{head}"] = _auroc(yt, comp["value_raw"])
            row[f"served_{head}_ece"] = _ece(yt, comp["probability"])
            row[f"value_{head}_ece"] = _ece(yt, comp["value_probability"])
            row[f"served_{head}_brier"] = brier_loss(yt, comp["probability"])
            if head == heads[0]:
                # OOD: the left-out source against the fitted sources' test rows, under the fold's own fit.
                # against rows of the same kind only: multiple-choice and open prompts are trivially apart
                others = (split == "test") & (sources != s) & (side.kind == side.kind[target][0])
                d_target = comp["ood_distance"]
                d_other = model.components(X[others], side[others])["ood_distance"]
                row["ood_auroc"] = _auroc(np.r_[np.ones(len(d_target)), np.zeros(len(d_other))], np.r_[d_target, d_other])
                row["ood_flagged"] = float(comp["ood"].mean())
                study.predictions[s] = {"y": yt, "probability": comp["probability"], "ood": comp["ood"], "by_mode": {}}
        row["dense"] = study.dense[s]
        row["max_softmax"] = _auroc(yt, side.max_softmax[target])
        row["neg_entropy"] = _auroc(yt, -side.entropy[target])
        for name, score in (baselines or {}).items():
            score = np.asarray(score, dtype=np.float64)[target]
            row[f"baseline:{name}"] = _auroc(yt, score) if np.isfinite(score).all() else None
        kind = side.kind[target][0]
        kf, kc = fit & (side.kind == kind), cal & (side.kind == kind)
        if monotone and len(np.unique(y[kf])) == 2 and len(np.unique(y[kc])) == 2:  # the next_token mode as served
            nts = _stacker_for("next_token", seed=seed, names=stack_names, monotone=True).fit(
                side.stack_inputs(np.zeros(kf.sum()), kf), y[kf], side.stack_inputs(np.zeros(kc.sum()), kc),
                y[kc]).predict_proba(side.stack_inputs(np.zeros(target.sum()), target))
        else:
            nts = NextTokenStack().fit(side[fit], y[fit], side[cal], y[cal]).predict_proba(side[target])
        row["next_token_stack"] = _auroc(yt, nts) if np.isfinite(nts).all() else None
        row["next_token_stack_ece"] = _ece(yt, nts) if np.isfinite(nts).all() else None
        if s in study.predictions and np.isfinite(nts).all():
            study.predictions[s]["by_mode"]["next_token"] = nts
        for mode in free_modes:
            if len(np.unique(y[kf])) < 2 or len(np.unique(y[kc])) < 2:
                break
            stacker = _stacker_for(mode, seed=seed, names=stack_names, monotone=monotone).fit(
                side.stack_inputs(np.zeros(kf.sum()), kf), y[kf], side.stack_inputs(np.zeros(kc.sum()), kc), y[kc])
            p = stacker.predict_proba(side.stack_inputs(np.zeros(target.sum()), target))
            row[mode], row[f"{mode}_ece"] = _auroc(yt, p), _ece(yt, p)
            if s in study.predictions:
                study.predictions[s]["by_mode"][mode] = p
        rand = [_auroc(yt, LinearProbe().fit(X[fit][:, d], y[fit], sample_weight=weights[s]).decision_function(
            X[target][:, d])) for d in draws]
        rand = np.array([r for r in rand if r is not None])
        row["random_mean"] = float(rand.mean()) if len(rand) else None
        row["random_sd"] = float(rand.std()) if len(rand) else None
        sparse_value = row.get("value_linear") if study.random_k == study.k else study.k_curve[study.random_k].get(s)
        row["random_k"], row["sparse_value"] = study.random_k, sparse_value
        row["value_percentile"] = (float((rand < sparse_value).mean() * 100)
                                   if sparse_value is not None and len(rand) else None)
        study.rows[s] = row
    mean_head = {h: float(np.mean([v for v in per.values() if v is not None])) for h, per in study.heads.items()}
    study.head = max(mean_head, key=mean_head.get)
    for s, heads_ in by_head.items():  # the stacked and value predictions of the head that is served
        if s in study.predictions:
            study.predictions[s]["by_mode"].update(heads_[study.head])
    # Per kind, serve what transfers best on average over that kind's left-out sources (a choice among three
    # scores, made on these same numbers: the card says so).
    columns = {"stacked": f"served_{study.head}", "next_token": "next_token_stack", "value": f"value_{study.head}",
               **{m: m for m in free_modes}}
    ece_columns = {"stacked": f"served_{study.head}_ece", "next_token": "next_token_stack_ece",
                   "value": f"value_{study.head}_ece", **{m: f"{m}_ece" for m in free_modes}}

    def best_mode(rows) -> str:
        means = {mode: np.mean([r[col] if r.get(col) is not None else 0.5 for r in rows])
                 for mode, col in columns.items()}
        return max(means, key=lambda m: (means[m], m == "stacked"))

    study.modes = {}
    for kind in KINDS:
        rows = [r for r in study.rows.values() if r["kind"] == kind]
        if rows:
            study.modes[kind] = best_mode(rows)
    for s, r in study.rows.items():
        others = [o for t, o in study.rows.items() if t != s and o["kind"] == r["kind"]]
        mode = best_mode(others) if others else study.modes.get(r["kind"], "stacked")
        r["served_mode"] = mode
        r["served"] = r.get(columns[mode])
        r["served_ece"] = r.get(ece_columns[mode])
        # calibrated out of source: Platt on what the same mode predicted for the kind's *other* left-out sources
        # (each by models that never saw it), then applied here (cross-fitted: never fitted on this source)
        pool = [t for t, o in study.rows.items() if t != s and o["kind"] == r["kind"]
                and mode in study.predictions.get(t, {}).get("by_mode", {})]
        if pool and mode in study.predictions.get(s, {}).get("by_mode", {}):
            a, b = out_of_source_platt([study.predictions[t]["by_mode"][mode] for t in pool],
                                       [study.predictions[t]["y"] for t in pool])
            p = expit(a * clipped_logit(study.predictions[s]["by_mode"][mode]) + b)
            r["served_ece_cross_fitted"] = _ece(study.predictions[s]["y"], p)
    return study


def out_of_source_platt(probabilities, labels) -> tuple[float, float]:
    """Platt ``(a, b)`` on the logits of probabilities predicted for sources their models never saw (a list of
    arrays, one per source, each weighing the same): the map that makes a served probability mean on a new source
    what it meant on the left-out ones."""
    z = np.concatenate([clipped_logit(p) for p in probabilities])
    y = np.concatenate([np.asarray(t) for t in labels])
    w = np.concatenate([np.full(len(p), 1.0 / len(p)) for p in probabilities]) * len(z) / len(probabilities)
    platt = PlattCalibrator().fit(z, y, sample_weight=w)
    return float(platt.a_), float(platt.b_)
