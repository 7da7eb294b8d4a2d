"""Which answer-level features transfer (issue 31): a leave-one-source-out study over the answer-end cache.

Every number here is a left-out source scored by models fitted on the other sources only:

- **Hidden-state reads** of the answer, each with a dense linear probe (source-balanced weights, the same
  :class:`~valueprobe.calibration.probes.LinearProbe` the artifacts use): the last answer token, the answer's tokens
  averaged (``answer_mean``), the state at its least likely token (``answer_min_token``), the last token and the
  mean side by side, at a few layers, and the mean averaged over the middle layers. Next to the best read, the
  sparse value-neuron set of the same size the shipped artifact uses (pruned on the fitting sources only) and
  random sets of that size.
- **Free signals** of the same pass: the answer's sum, minimum and mean token log-probability and the prompt's
  max-softmax.
- **A stack that never falls below its best input**: per kind, a logistic stack of the probe's logit and the free
  signals (and, for multiple choice, the chance level ``1 / options``), constrained to be monotone in the
  log-probabilities (a coefficient of the wrong sign drops that input); the served score is chosen among the stack,
  the probe and each free signal by an *inner* leave-one-source-out over the fitting sources (nested, so the
  served column is not chosen on the source it is judged on). Platt per kind on the fitting sources gives the
  calibrated probability whose ECE on the left-out source is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..plugin.readout import clipped_logit
from .calibrators import PlattCalibrator
from .metrics import auroc_score, expected_calibration_error
from .probes import LinearProbe
from .transfer import KindStacker, balanced_weights, prune_path

__all__ = ["AnswerData", "load_answer_cache", "read_features", "study", "report_markdown"]

FREE = ("answer_sum_logprob", "answer_min_logprob", "answer_mean_logprob", "max_softmax")
LOGPROB_FLOOR = -30.0


@dataclass
class AnswerData:
    rows: list[dict]
    reads: dict[str, torch.Tensor]  # name -> [n, len(layers), H]
    layers: list[int]
    n_options: np.ndarray  # 0 for open questions

    @property
    def y(self) -> np.ndarray:
        return np.array([r["label"] for r in self.rows], dtype=np.int64)

    @property
    def sources(self) -> np.ndarray:
        return np.array([r["dataset"] for r in self.rows])

    @property
    def kinds(self) -> np.ndarray:
        return np.array(["choice" if r["kind"] == "choice" else "open" for r in self.rows])

    def free(self, name: str) -> np.ndarray:
        values = np.array([np.nan if r.get(name) is None else r[name] for r in self.rows], dtype=np.float64)
        return np.where(np.isnan(values), LOGPROB_FLOOR, np.maximum(values, 10 * LOGPROB_FLOOR))


def load_answer_cache(folder: str | Path, layers: list[int], *, n_options: dict[str, int] | None = None) -> AnswerData:
    """The answer-end shards of ``folder`` (``<cache>/<key>-answer_end``) that carry the pooled reads, only
    ``layers`` (1-based) kept, so thousands of questions fit in memory."""
    from safetensors.torch import load_file

    rows, reads = [], {"last": [], "answer_mean": [], "answer_min_token": []}
    at = torch.tensor([layer - 1 for layer in layers])
    for meta in sorted(Path(folder).glob("shard-*.json")):
        tensors_path = meta.with_suffix(".safetensors")
        if not tensors_path.exists():
            continue
        tensors = load_file(str(tensors_path))
        if "answer_mean" not in tensors:
            continue
        rows += json.loads(meta.read_text())
        reads["last"].append(tensors["features"][:, at])
        reads["answer_mean"].append(tensors["answer_mean"][:, at])
        reads["answer_min_token"].append(tensors["answer_min_token"][:, at])
    if not rows:
        raise ValueError(f"no answer-end shards with pooled reads in {folder}")
    options = np.array([(n_options or {}).get(r["id"], 0) if r["kind"] == "choice" else 0 for r in rows])
    return AnswerData(rows, {k: torch.cat(v) for k, v in reads.items()}, list(layers), options)


def read_features(data: AnswerData, read: str, layer: int | str) -> np.ndarray:
    """``read`` in last / answer_mean / answer_min_token / last+mean at ``layer``, or ``"middle"``: the answer
    mean averaged over the loaded layers."""
    if layer == "middle":
        return data.reads["answer_mean"].mean(dim=1).numpy()
    i = data.layers.index(layer)
    if read == "last+mean":
        return torch.cat([data.reads["last"][:, i], data.reads["answer_mean"][:, i]], dim=1).numpy()
    return data.reads[read][:, i].numpy()


def _auroc(y, s) -> float | None:
    return auroc_score(y, s) if len(np.unique(y)) == 2 else None


def _probe_logit(X, y, sources, fit, score) -> np.ndarray:
    probe = LinearProbe().fit(X[fit], y[fit], sample_weight=balanced_weights(y[fit], sources[fit]))
    return probe.decision_function(X[score])


#: the study's stack columns, the free ones named as the served stacker names them, so :class:`KindStacker` knows
#: which must not count against confidence (a higher log-probability or max-softmax never lowers it); the probe's
#: cross-fitted logit (``probe_logit``, not a served column name) and ``log_options`` stay unconstrained
STACK_COLUMNS = ("probe_logit",) + FREE[:3] + ("logit_max_softmax", "log_options")


def _stack_columns(data: AnswerData, probe_logit: np.ndarray, rows: np.ndarray, kind: str) -> np.ndarray:
    cols = [probe_logit] + [data.free(name)[rows] for name in FREE[:3]]
    cols.append(clipped_logit(data.free("max_softmax")[rows]))
    if kind == "choice":
        cols.append(np.log(np.maximum(data.n_options[rows], 2)))
    return np.column_stack(cols)


def _monotone_stack(columns: np.ndarray, y: np.ndarray) -> KindStacker:
    """The served answer fit's monotone stacker (a column of the wrong sign is dropped, not flipped); its Platt
    step is fitted on the same rows and unused here: the study ranks by, and calibrates, the raw logit."""
    return KindStacker(monotone=True, names=STACK_COLUMNS).fit(columns, y, columns, y)


def _cross_fitted_logit(X, y, sources, fit_rows: np.ndarray) -> np.ndarray:
    """The probe's logit on ``fit_rows``, each source's rows scored by a probe fitted on the other fitting sources
    (so the stack learns from logits as a new source will see them)."""
    out = np.zeros(len(fit_rows))
    names = np.unique(sources[fit_rows])
    for s in names:
        held = sources[fit_rows] == s
        out[held] = _probe_logit(X, y, sources, fit_rows[~held], fit_rows[held])
    return out


def _candidates(data: AnswerData, X, fit_rows, score_rows, kind) -> dict[str, np.ndarray]:
    """Every candidate served score of ``kind`` for ``score_rows``, fitted on ``fit_rows`` (all sources' rows for
    the probe; the kind's rows for the stack)."""
    y, sources = data.y, data.sources
    probe_score = _probe_logit(X, y, sources, fit_rows, score_rows)
    out = {"probe": probe_score}
    for name in FREE:
        out[name] = data.free(name)[score_rows]
    kind_fit = fit_rows[data.kinds[fit_rows] == kind]
    if len(np.unique(sources[kind_fit])) >= 2 and len(np.unique(y[kind_fit])) == 2:
        fit_logit = _cross_fitted_logit(X, y, sources, kind_fit)
        stack = _monotone_stack(_stack_columns(data, fit_logit, kind_fit, kind), y[kind_fit])
        out["stack"] = stack.decision_function(_stack_columns(data, probe_score, score_rows, kind))
    return out


def study(data: AnswerData, *, reads: list[tuple[str, int | str]], k_sparse: int = 4, random_draws: int = 20,
          seed: int = 0, progress=None) -> dict:
    """The leave-one-source-out study (see the module docstring). Returns per left-out source every read's probe
    AUROC, the free signals', the stack's, the nested choice and its AUROC and ECE, and the sparse/random sets."""
    y, sources, kinds = data.y, data.sources, data.kinds
    names = sorted(np.unique(sources))
    rng = np.random.default_rng(seed)
    out = {"sources": {}, "reads": [f"{r}@{layer}" for r, layer in reads], "n": len(y)}
    features = {f"{r}@{layer}": read_features(data, r, layer) for r, layer in reads}
    for s in names:
        held = np.where(sources == s)[0]
        fit = np.where(sources != s)[0]
        kind = kinds[held[0]]
        rec = {"kind": kind, "n": len(held), "accuracy": float(y[held].mean()), "reads": {}, "free": {}}
        for name in FREE:
            rec["free"][name] = _auroc(y[held], data.free(name)[held])
        for key, X in features.items():
            rec["reads"][key] = _auroc(y[held], _probe_logit(X, y, sources, fit, held))
            if progress:
                progress()
        out["sources"][s] = rec
    # the read with the best mean (and min) over left-out sources: the one the stack and the sparse sets use
    means = {k: float(np.nanmean([r["reads"][k] for r in out["sources"].values() if r["reads"][k] is not None]))
             for k in features}
    mins = {k: float(np.nanmin([r["reads"][k] for r in out["sources"].values() if r["reads"][k] is not None]))
            for k in features}
    best = max(features, key=lambda k: (means[k] + mins[k]) / 2)
    out["read_mean"], out["read_min"], out["best_read"] = means, mins, best
    X = features[best]
    for s in names:
        held = np.where(sources == s)[0]
        fit = np.where(sources != s)[0]
        kind = kinds[held[0]]
        rec = out["sources"][s]
        cands = _candidates(data, X, fit, held, kind)
        rec["stack"] = _auroc(y[held], cands["stack"]) if "stack" in cands else None
        # nested choice among the candidates: inner leave-one-source-out over the fitting sources of this kind
        inner_sources = [t for t in np.unique(sources[fit]) if kinds[sources == t][0] == kind]
        inner = {c: [] for c in cands}
        for t in inner_sources:
            t_rows = np.where(sources == t)[0]
            t_fit = fit[sources[fit] != t]
            for c, score in _candidates(data, X, t_fit, t_rows, kind).items():
                value = _auroc(y[t_rows], score)
                if value is not None and c in inner:
                    inner[c].append(value)
        chosen = max((c for c in inner if inner[c]), key=lambda c: np.mean(inner[c]), default="probe")
        rec["served"], rec["served_auroc"] = chosen, _auroc(y[held], cands[chosen])
        # calibrated on the fitting sources of this kind (the same choice, Platt on its score)
        kind_fit = fit[kinds[fit] == kind]
        fit_scores = _candidates_on(data, X, kind_fit, kind, chosen)
        platt = PlattCalibrator().fit(fit_scores, y[kind_fit])
        p = platt.predict_proba(cands[chosen])
        rec["served_ece"] = float(expected_calibration_error(y[held], p, n_bins=10, strategy="quantile"))
        rec["best_free"] = max((v for v in rec["free"].values() if v is not None), default=None)
        # the sparse value-neuron set of the shipped size, pruned on the fitting sources, and random sets
        paths = prune_path(X[fit], y[fit], sizes=(k_sparse,), seed=seed,
                           sample_weight=balanced_weights(y[fit], sources[fit]))
        idx = paths[k_sparse]
        rec["sparse"] = _auroc(y[held], _probe_logit(X[:, idx], y, sources, fit, held))
        draws = [_auroc(y[held], _probe_logit(X[:, rng.choice(X.shape[1], k_sparse, replace=False)], y, sources,
                                              fit, held)) for _ in range(random_draws)]
        rec["random_mean"] = float(np.mean([d for d in draws if d is not None]))
        if progress:
            progress()
    return out


def _candidates_on(data: AnswerData, X, rows, kind, chosen) -> np.ndarray:
    """The chosen candidate's score on the fitting rows themselves, cross-fitted by source (what Platt is fitted
    on)."""
    y, sources = data.y, data.sources
    if chosen in FREE:
        return data.free(chosen)[rows]
    logit = _cross_fitted_logit(X, y, sources, rows)
    if chosen == "probe":
        return logit
    stack = _monotone_stack(_stack_columns(data, logit, rows, kind), y[rows])
    return stack.decision_function(_stack_columns(data, logit, rows, kind))


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def report_markdown(result: dict, *, baseline: dict | None = None) -> str:
    """The study as markdown tables: reads (mean and min over left-out sources), and per source the free signals,
    the stack, the nested served choice with its ECE, and the sparse and random sets."""
    lines = [f"Questions: {result['n']}; every number a left-out source scored by models fitted on the others.", "",
             "### Hidden-state reads (dense linear probe), AUROC over left-out sources", "",
             "| read @ layer | mean | min |", "|---|---|---|"]
    for k in result["reads"]:
        mark = " **(used below)**" if k == result["best_read"] else ""
        lines.append(f"| {k}{mark} | {result['read_mean'][k]:.3f} | {result['read_min'][k]:.3f} |")
    lines += ["", "### Per left-out source", "",
              "| source | kind | n | acc. | answer sum lp | answer min lp | answer mean lp | prompt max-softmax | "
              "best free | probe (best read) | monotone stack | **served (nested choice)** | served − best free | "
              "served ECE (eq. mass) | sparse k | random k |", "|" + "---|" * 16]
    for s, r in result["sources"].items():
        diff = None if r["served_auroc"] is None or r["best_free"] is None else r["served_auroc"] - r["best_free"]
        lines.append(f"| {s} | {r['kind']} | {r['n']} | {r['accuracy']:.2f} | "
                     + " | ".join(_fmt(r["free"][n]) for n in FREE)
                     + f" | {_fmt(r['best_free'])} | {_fmt(r['reads'][result['best_read']])} | {_fmt(r['stack'])} | "
                       f"{r['served']}: **{_fmt(r['served_auroc'])}** | {'—' if diff is None else f'{diff:+.3f}'} | "
                       f"{r['served_ece']:.3f} | {_fmt(r['sparse'])} | {r['random_mean']:.3f} |")
    served = [r["served_auroc"] for r in result["sources"].values() if r["served_auroc"] is not None]
    below = [s for s, r in result["sources"].items()
             if r["served_auroc"] is not None and r["best_free"] is not None and r["served_auroc"] < r["best_free"]]
    eces = [r["served_ece"] for r in result["sources"].values()]
    lines += ["", f"Served, leave-one-source-out over {len(result['sources'])} sources: min {min(served):.3f}, mean "
              f"{np.mean(served):.3f} (target min ≥ 0.78); below the best free signal of the source on {len(below)} "
              f"({', '.join(below) or 'none'}; target none); ECE on left-out sources: max {max(eces):.3f}, mean "
              f"{np.mean(eces):.3f} (target ≤ 0.08)."]
    return "\n".join(lines) + "\n"
