"""The runtime readout: k neuron values -> raw score (a logit) -> calibrated probability.

Everything here is a pure function of plain tensors so that the artifact can hold it without pickle. The
calibration room fits these parameters (``valueprobe.calibration``) and delegates its ``predict_proba`` back to
these functions, so fit-time and serve-time probabilities come from one implementation.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit, logit

__all__ = ["HEADS", "CALIBRATORS", "head_logit", "calibrate", "CALIBRATOR_PARAMS", "HEAD_PARAMS", "STACK_FEATURES",
           "STACK_PARAMS", "ANSWER_STACK_FEATURES", "ANSWER_STACK_LAYOUTS", "ANSWER_READS", "answer_signals",
           "answer_columns", "summary_columns", "pool_answer", "clipped_logit", "compose_maps", "map_between", "stack_features", "stack_logit", "stack_proba",
           "mahalanobis"]

HEADS = ("linear", "mlp")
CALIBRATORS = ("identity", "platt", "temperature", "isotonic")

# Tensor names each piece needs in the artifact (prefixes "head." / "calibrator." are added there).
HEAD_PARAMS = {
    "linear": ("weight", "bias"),
    "mlp": ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"),
}
CALIBRATOR_PARAMS = {
    "identity": (),
    "platt": ("a", "b"),
    "temperature": ("temperature",),
    "isotonic": ("x_thresholds", "y_thresholds"),
}


def head_logit(kind: str, params: dict[str, torch.Tensor], standardized: torch.Tensor) -> torch.Tensor:
    """Raw logit per row of ``standardized`` (``[n, k]``, already ``(x - mean) / scale``).

    ``linear``: ``x @ w + b``. ``mlp``: ``fc2(relu(fc1(x)))`` with hidden width ``fc1.weight.shape[0]``.
    """
    if kind == "linear":
        return standardized @ params["weight"] + params["bias"]
    if kind == "mlp":
        hidden = torch.relu(standardized @ params["fc1.weight"].T + params["fc1.bias"])
        return hidden @ params["fc2.weight"] + params["fc2.bias"]
    raise ValueError(f"unknown head {kind!r}; expected one of {HEADS}")


def _sigmoid(z) -> np.ndarray:
    return expit(np.asarray(z, dtype=np.float64))  # numerically stable for large |z|


def calibrate(kind: str, params: dict[str, np.ndarray], raw: np.ndarray) -> np.ndarray:
    """Map raw logits to probabilities in [0, 1].

    ``identity``: sigmoid. ``platt``: ``sigmoid(a * raw + b)``. ``temperature``: ``sigmoid(raw / T)``.
    ``isotonic``: piecewise-linear through ``(x_thresholds, y_thresholds)``, clipped outside their range (the
    serving default: extrapolating a step function is never safer than holding its end value).
    """
    raw = np.asarray(raw, dtype=np.float64)
    if kind == "identity":
        return _sigmoid(raw)
    if kind == "platt":
        return _sigmoid(float(params["a"].reshape(-1)[0]) * raw + float(params["b"].reshape(-1)[0]))
    if kind == "temperature":
        return _sigmoid(raw / float(params["temperature"].reshape(-1)[0]))
    if kind == "isotonic":
        x = np.asarray(params["x_thresholds"], dtype=np.float64)
        y = np.asarray(params["y_thresholds"], dtype=np.float64)
        return np.clip(np.interp(raw, x, y), 0.0, 1.0)
    raise ValueError(f"unknown calibrator {kind!r}; expected one of {CALIBRATORS}")


# -- the served score: value neurons stacked with the free next-token signal, per question kind ------------------
STACK_FEATURES = ("value_raw", "logit_max_softmax", "entropy")
STACK_PARAMS = ("mean", "scale", "weight", "bias", "calibrator.a", "calibrator.b")


# At the answer's end the stack also takes the answer's own token log-probabilities from the same generation (the
# signals a router computes from ``logprobs``): their sum (the sequence log-probability) and their minimum, after
# the prompt's next-token columns, which the same generation computed at its prefill. The artifact names its
# columns in ``stack_features``.
ANSWER_STACK_FEATURES = ("value_raw", "logit_max_softmax", "entropy", "answer_sum_logprob", "answer_min_logprob")
LOGPROB_FLOOR = -30.0  # an empty answer, or a token the model all but ruled out: the stacker sees a finite value

# The second layout (issue 31) adds the answer's mean token log-probability (the sequence likelihood per token:
# the best free signal on reading-comprehension sources, where answers are long) and the multiple-choice chance
# level as ``log(options)`` (a two-option question's 50% is not a five-option one's 20%; 0 for open questions).
ANSWER_STACK_FEATURES_V2 = ANSWER_STACK_FEATURES + ("answer_mean_logprob", "log_options")
#: every column layout an answer_end artifact may name in ``stack_features`` (older artifacts keep the first)
ANSWER_STACK_LAYOUTS = (ANSWER_STACK_FEATURES, ANSWER_STACK_FEATURES_V2)

#: where an answer_end artifact reads the answer: ``last`` (the state at its last token) or ``mean`` (the states
#: of every answer token averaged: a running sum in the decoding hook, so serving it costs no extra pass)
ANSWER_READS = ("last", "mean")


def pool_answer(states, read: str):
    """One answer's read from ``states`` ``[t, k]``: the values at every position that fed one of its tokens, in
    order (the last row is the state at its last token). ``last``: that row; ``mean``: all rows averaged. An
    answer with no positions (empty) passes its single prompt-end row."""
    states = torch.as_tensor(states)
    if read == "last":
        return states[-1]
    if read == "mean":
        return states.float().mean(dim=0).to(states.dtype)
    raise ValueError(f"unknown answer read {read!r}; expected one of {ANSWER_READS}")


def answer_columns(names, token_logprobs, n_options: int = 0) -> list[float]:
    """The free answer-side stack columns ``names`` (those after the three prompt columns of
    :data:`STACK_FEATURES`) of one answer: from its token log-probabilities and, for multiple choice, its number of
    options (0 for an open question)."""
    lp = np.asarray(token_logprobs, dtype=np.float64).reshape(-1)
    if not lp.size:  # an empty answer: every log-probability column at the floor
        return summary_columns(names, LOGPROB_FLOOR, LOGPROB_FLOOR, LOGPROB_FLOOR, n_options)
    return summary_columns(names, lp.sum(), lp.min(), lp.mean(), n_options)


def summary_columns(names, sum_logprob: float, min_logprob: float, mean_logprob: float,
                    n_options: int = 0) -> list[float]:
    """:func:`answer_columns` from an answer's summaries (rows that carry the three numbers rather than the list),
    floored as :func:`floored_signals` floors them."""
    total, low = floored_signals(sum_logprob, min_logprob)
    values = {"answer_sum_logprob": total, "answer_min_logprob": low,
              "answer_mean_logprob": float(max(mean_logprob, LOGPROB_FLOOR)),
              "log_options": float(np.log(n_options)) if n_options and n_options >= 2 else 0.0}
    try:
        return [values[name] for name in names]
    except KeyError as exc:
        raise ValueError(f"unknown answer stack column {exc.args[0]!r}; known: {sorted(values)}") from None


def answer_signals(token_logprobs) -> tuple[float, float]:
    """``(sum, min)`` of one answer's token log-probabilities, each floored at :data:`LOGPROB_FLOOR` (an empty
    answer is the least confident one can be: both at the floor)."""
    lp = np.asarray(token_logprobs, dtype=np.float64).reshape(-1)
    if lp.size == 0:
        return LOGPROB_FLOOR, LOGPROB_FLOOR
    return floored_signals(lp.sum(), lp.min())


def floored_signals(sum_logprob: float, min_logprob: float) -> tuple[float, float]:
    """An answer's ``(sum, min)`` token log-probability floored as :func:`answer_signals` floors them (for rows
    that carry the two numbers rather than the list)."""
    return float(max(sum_logprob, 10 * LOGPROB_FLOOR)), float(max(min_logprob, LOGPROB_FLOOR))


def compose_maps(outer: tuple[float, float], inner: tuple[float, float]) -> tuple[float, float]:
    """The logit map ``z -> a * z + b`` that applies ``inner`` then ``outer``: ``(a_o * a_i, a_o * b_i + b_o)``."""
    (a_o, b_o), (a_i, b_i) = outer, inner
    return a_o * a_i, a_o * b_i + b_o


def map_between(inner: tuple[float, float], target: tuple[float, float]) -> tuple[float, float]:
    """The logit map that, composed after ``inner``, gives ``target`` (``compose_maps(result, inner) == target``)."""
    (a_i, b_i), (a_t, b_t) = inner, target
    a = a_t / a_i
    return a, b_t - a * b_i


def clipped_logit(p, eps: float = 1e-6) -> np.ndarray:
    """``logit(p)`` with ``p`` clipped to ``[eps, 1 - eps]`` (finite for 0 and 1): the one clipped logit of the
    stack's inputs, feedback's fitted logit and the router's features."""
    return logit(np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps))


def stack_features(value_raw, max_softmax, entropy, extra=None) -> np.ndarray:
    """``[n, 3 + m]`` stacking inputs: :data:`STACK_FEATURES` order (the max-softmax enters as a logit), then the
    ``m`` columns of ``extra`` (at the answer's end: :func:`answer_signals` per row; see
    :data:`ANSWER_STACK_FEATURES`)."""
    cols = np.c_[np.asarray(value_raw, dtype=np.float64), clipped_logit(max_softmax), np.asarray(entropy, dtype=np.float64)]
    if extra is not None:
        cols = np.c_[cols, np.asarray(extra, dtype=np.float64).reshape(len(cols), -1)]
    return cols


def stack_logit(params: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Logistic stacker of one kind: ``((f - mean) / scale) @ weight + bias``."""
    f = (np.asarray(features, dtype=np.float64) - params["mean"]) / params["scale"]
    return f @ params["weight"] + float(np.asarray(params["bias"]).reshape(-1)[0])


def stack_proba(params: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Calibrated P(correct) of the stacked score: Platt on the stacker's logit (fitted on the calibration split)."""
    a = float(np.asarray(params["calibrator.a"]).reshape(-1)[0])
    b = float(np.asarray(params["calibrator.b"]).reshape(-1)[0])
    return _sigmoid(a * stack_logit(params, features) + b)


def mahalanobis(values: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distance of each row of ``values`` ``[n, k]`` from the fitting distribution (mean, precision matrix)."""
    d = np.asarray(values, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, np.asarray(precision, dtype=np.float64), d), 0.0))
