"""The runtime readout: k neuron values -> raw score (a logit) -> calibrated probability.

Everything here is a pure function of plain tensors so that the artifact can hold it without pickle. The
calibration room fits these parameters (``valueprobe.calibration``) and delegates its ``predict_proba`` back to
these functions, so fit-time and serve-time probabilities come from one implementation.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["HEADS", "CALIBRATORS", "head_logit", "calibrate", "CALIBRATOR_PARAMS", "HEAD_PARAMS"]

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


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Numerically stable for large |z|.
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


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
