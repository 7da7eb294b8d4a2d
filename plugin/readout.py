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
           "STACK_PARAMS", "ANSWER_STACK_FEATURES", "answer_signals", "stack_features", "stack_logit", "stack_proba",
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


# At the answer's end the stacker's two free columns are the answer's own token log-probabilities from the same
# pass (the signals a router computes from ``logprobs``): the mean token probability enters where the max-softmax
# does, as a logit, and the largest surprise (-min log-probability) where the entropy does. The artifact names
# them in its ``stack_features`` metadata.
ANSWER_STACK_FEATURES = ("value_raw", "logit_mean_token_probability", "max_token_surprise")


def answer_signals(token_logprobs) -> tuple[float, float]:
    """``(mean token probability, max token surprise)`` of one answer from its tokens' log-probabilities:
    ``exp(mean log p)`` (the geometric mean) and ``-min log p``. An empty answer is the least confident
    one can be: ``(0, inf)`` is clipped to ``(1e-6, 30)`` so the stacker never sees a non-finite value."""
    lp = np.asarray(token_logprobs, dtype=np.float64).reshape(-1)
    if lp.size == 0:
        return 1e-6, 30.0
    return float(np.exp(lp.mean())), float(min(-lp.min(), 30.0))


def _logit(p: np.ndarray) -> np.ndarray:
    return logit(np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6))


def stack_features(value_raw, max_softmax, entropy) -> np.ndarray:
    """``[n, 3]`` stacking inputs in :data:`STACK_FEATURES` order (the max-softmax enters as a logit)."""
    return np.c_[np.asarray(value_raw, dtype=np.float64), _logit(max_softmax), np.asarray(entropy, dtype=np.float64)]


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
