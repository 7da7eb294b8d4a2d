"""Calibrators: raw probe logits -> P(correct).

Estimators in the scikit-learn style: ``__init__`` stores keyword-only parameters, ``fit(raw, y)`` returns
``self``, fitted state ends in ``_``, ``predict_proba`` refuses before ``fit``. Each exports its state as plain
arrays (``to_params``) and rebuilds from them (``from_params``); prediction always goes through
:func:`valueprobe.plugin.readout.calibrate`, the function the runtime uses, so a calibrator and the artifact
that carries it give identical probabilities.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from valueprobe.plugin.readout import calibrate

__all__ = ["PlattCalibrator", "TemperatureCalibrator", "IsotonicCalibrator", "IdentityCalibrator", "CALIBRATOR_CLASSES", "make_calibrator"]


def _validate(raw, y, sample_weight=None):
    raw = np.asarray(raw, dtype=np.float64).reshape(-1)
    y = np.asarray(y).reshape(-1)
    if len(raw) != len(y):
        raise ValueError(f"length mismatch: {len(raw)} scores, {len(y)} labels")
    if len(raw) == 0:
        raise ValueError("cannot fit a calibrator on no data")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if len(np.unique(y)) < 2:
        raise ValueError("calibration data holds one class only")
    if not np.isfinite(raw).all():
        raise ValueError("raw scores must be finite")
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if len(sample_weight) != len(y) or (sample_weight < 0).any():
            raise ValueError("sample_weight must be non-negative with one weight per sample")
    return raw, y.astype(np.float64), sample_weight


class _Calibrator(BaseEstimator):
    """Base: scikit-learn ``get_params`` / ``clone`` from the keyword-only ``__init__``."""

    kind: str = ""

    def _params(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def to_params(self) -> dict[str, np.ndarray]:
        """The fitted state as named float64 arrays (what the artifact stores)."""
        self._check_fitted()
        return {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self._params().items()}

    def _check_fitted(self):
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet; call fit(raw, y) first")

    def predict_proba(self, raw) -> np.ndarray:
        """Calibrated probability of the positive class, shape ``[n]``."""
        self._check_fitted()
        return calibrate(self.kind, self.to_params(), np.asarray(raw, dtype=np.float64).reshape(-1))

    @classmethod
    def from_params(cls, params: dict[str, np.ndarray]):
        obj = cls()
        obj._set_state(params)
        obj.fitted_ = True
        return obj


class IdentityCalibrator(_Calibrator):
    """No calibration: ``sigmoid(raw)``."""

    kind = "identity"

    def fit(self, raw, y, sample_weight=None):
        _validate(raw, y, sample_weight)
        self.fitted_ = True
        return self

    def _params(self):
        return {}

    def _set_state(self, params):
        pass


class PlattCalibrator(_Calibrator):
    """Platt scaling: ``sigmoid(a * raw + b)``, fitted by (nearly unregularised) logistic regression."""

    kind = "platt"

    def __init__(self, *, C: float = 1e6):
        self.C = C

    def fit(self, raw, y, sample_weight=None):
        raw, y, sw = _validate(raw, y, sample_weight)
        lr = LogisticRegression(C=self.C, max_iter=1000).fit(raw[:, None], y, sample_weight=sw)
        self.a_, self.b_ = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        self.fitted_ = True
        return self

    def _params(self):
        return {"a": self.a_, "b": self.b_}

    def _set_state(self, params):
        self.a_, self.b_ = float(params["a"][0]), float(params["b"][0])


class TemperatureCalibrator(_Calibrator):
    """Temperature scaling of a binary logit: ``sigmoid(raw / T)``, T > 0 minimising the log loss.

    One parameter, so it cannot change the ranking and rarely overfits; it cannot fix a shifted bias either
    (Platt can).
    """

    kind = "temperature"

    def __init__(self, *, bounds: tuple[float, float] = (1e-2, 1e2)):
        self.bounds = bounds

    def fit(self, raw, y, sample_weight=None):
        raw, y, sw = _validate(raw, y, sample_weight)
        w = np.ones_like(y) if sw is None else sw

        def nll(log_t):
            z = raw / np.exp(log_t)
            # log(1 + e^z) - y z, stable
            return float(np.sum(w * (np.logaddexp(0.0, z) - y * z)) / np.sum(w))

        res = minimize_scalar(nll, bounds=tuple(np.log(self.bounds)), method="bounded")
        self.temperature_ = float(np.exp(res.x))
        self.fitted_ = True
        return self

    def _params(self):
        return {"temperature": self.temperature_}

    def _set_state(self, params):
        self.temperature_ = float(params["temperature"][0])


class IsotonicCalibrator(_Calibrator):
    """Isotonic regression (scikit-learn), exported as its threshold arrays; clipped outside them."""

    kind = "isotonic"

    def __init__(self, *, y_min: float = 0.0, y_max: float = 1.0):
        self.y_min, self.y_max = y_min, y_max

    def fit(self, raw, y, sample_weight=None):
        raw, y, sw = _validate(raw, y, sample_weight)
        iso = IsotonicRegression(y_min=self.y_min, y_max=self.y_max, increasing=True, out_of_bounds="clip")
        iso.fit(raw, y, sample_weight=sw)
        self.x_thresholds_ = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_thresholds_ = np.asarray(iso.y_thresholds_, dtype=np.float64)
        self.fitted_ = True
        return self

    def _params(self):
        return {"x_thresholds": self.x_thresholds_, "y_thresholds": self.y_thresholds_}

    def _set_state(self, params):
        self.x_thresholds_ = np.asarray(params["x_thresholds"], dtype=np.float64)
        self.y_thresholds_ = np.asarray(params["y_thresholds"], dtype=np.float64)


CALIBRATOR_CLASSES = {
    c.kind: c for c in (IdentityCalibrator, PlattCalibrator, TemperatureCalibrator, IsotonicCalibrator)
}


def make_calibrator(kind: str) -> _Calibrator:
    try:
        return CALIBRATOR_CLASSES[kind]()
    except KeyError:
        raise ValueError(f"unknown calibrator {kind!r}; expected one of {sorted(CALIBRATOR_CLASSES)}") from None
