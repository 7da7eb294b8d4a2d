"""Probes on hidden states: standardised linear (L1 or L2 logistic) and the small two-layer MLP head.

Both are estimators in the scikit-learn style (keyword-only ``__init__``, ``fit`` returns ``self``, fitted state
ends in ``_``). ``decision_function`` returns the raw logit, ``predict_proba`` its sigmoid, and
``neuron_importance_`` ranks input neurons (|weight| for the linear head, the L1 norm of each input's first-layer
weights for the MLP) for magnitude pruning.

The MLP can train with a temporal-difference objective on trajectories (several states per question, terminal
reward): ``V(s_t)`` is regressed onto ``V(s_{t+1})`` (held fixed) and the last state onto the reward. Prompt-only
data is the one-state case, where TD reduces to plain cross-entropy on the reward.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from valueprobe.plugin.readout import head_logit

__all__ = ["Standardizer", "LinearProbe", "MLPProbe", "GroupCenteredProbe"]


def _check_xy(X, y=None):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X has non-finite values")
    if y is None:
        return X
    y = np.asarray(y).reshape(-1)
    if len(y) != len(X):
        raise ValueError(f"length mismatch: {len(X)} rows, {len(y)} labels")
    if not np.isin(y, (0, 1)).all() or len(np.unique(y)) < 2:
        raise ValueError("y must be 0/1 with both classes present")
    return X, y.astype(np.int64)


def Standardizer() -> StandardScaler:
    """Per-feature ``(x - mean_) / scale_`` (scikit-learn's ``StandardScaler``: constant features get scale 1)."""
    return StandardScaler()


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardised logistic regression on hidden units.

    Parameters
    ----------
    penalty: ``"l1"`` (sparse, liblinear) or ``"l2"`` (lbfgs).
    C: inverse regularisation strength.
    """

    def __init__(self, *, penalty: str = "l2", C: float = 0.05, max_iter: int = 2000, random_state: int = 0):
        self.penalty, self.C, self.max_iter, self.random_state = penalty, C, max_iter, random_state

    def fit(self, X, y, sample_weight=None):
        X, y = _check_xy(X, y)
        if self.penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {self.penalty!r}")
        self.standardizer_ = Standardizer().fit(X)
        solver = "liblinear" if self.penalty == "l1" else "lbfgs"
        kwargs = {"penalty": "l1"} if self.penalty == "l1" else {}
        lr = LogisticRegression(C=self.C, solver=solver, max_iter=self.max_iter, random_state=self.random_state, **kwargs)
        lr.fit(self.standardizer_.transform(X), y, sample_weight=sample_weight)
        self.coef_ = lr.coef_[0].astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        return self

    @property
    def neuron_importance_(self) -> np.ndarray:
        return np.abs(self.coef_)

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return self.standardizer_.transform(np.asarray(X, dtype=np.float64)) @ self.coef_ + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        return expit(self.decision_function(X))

    def head_params(self) -> dict[str, torch.Tensor]:
        """Parameters in the artifact's ``head.linear.*`` layout."""
        return {
            "weight": torch.tensor(self.coef_, dtype=torch.float32),
            "bias": torch.tensor([self.intercept_], dtype=torch.float32),
        }


class MLPProbe(ClassifierMixin, BaseEstimator):
    """Two-layer MLP head ``fc2(relu(fc1(x)))`` on standardised inputs, L1 on the first layer.

    Parameters
    ----------
    hidden: width of the hidden layer.
    l1: L1 penalty on ``fc1.weight`` (drives whole input columns towards zero, which is what pruning ranks).
    weight_decay, lr, epochs, batch_size, seed: optimiser settings (AdamW, full determinism on CPU).
    objective: ``"bce"`` (every state predicts the terminal reward) or ``"td"`` (temporal-difference, see module
        docstring).
    gamma: TD discount.
    """

    def __init__(
        self,
        *,
        hidden: int = 32,
        l1: float = 1e-4,
        weight_decay: float = 1e-2,
        lr: float = 3e-3,
        epochs: int = 60,
        batch_size: int = 128,
        objective: str = "bce",
        gamma: float = 1.0,
        seed: int = 0,
    ):
        self.hidden, self.l1, self.weight_decay, self.lr = hidden, l1, weight_decay, lr
        self.epochs, self.batch_size, self.objective, self.gamma, self.seed = epochs, batch_size, objective, gamma, seed

    def fit(self, X, y, sample_weight=None, trajectory_index=None):
        """Fit on states ``X`` ``[n, d]`` with terminal rewards ``y``.

        ``trajectory_index`` (``[n]`` ints) marks states of one trajectory, consecutive and in time order; the
        reward ``y`` is the trajectory's terminal reward, repeated. ``None`` means one state per trajectory.
        """
        X, y = _check_xy(X, y)
        if self.objective not in ("bce", "td"):
            raise ValueError(f"objective must be 'bce' or 'td', got {self.objective!r}")
        n, d = X.shape
        traj = np.arange(n) if trajectory_index is None else np.asarray(trajectory_index).reshape(-1)
        if len(traj) != n:
            raise ValueError("trajectory_index needs one entry per row")
        # next_index[i] = i + 1 when the next row continues the same trajectory, else -1 (terminal).
        next_index = np.where(np.r_[traj[1:] == traj[:-1], False], np.arange(1, n + 1), -1)
        self.standardizer_ = Standardizer().fit(X)
        gen = torch.Generator().manual_seed(self.seed)
        Xs = torch.tensor(self.standardizer_.transform(X), dtype=torch.float32)
        yt = torch.tensor(y, dtype=torch.float32)
        w = torch.ones(n) if sample_weight is None else torch.tensor(np.asarray(sample_weight), dtype=torch.float32)
        nxt = torch.tensor(next_index)
        fc1 = torch.nn.Linear(d, self.hidden)
        fc2 = torch.nn.Linear(self.hidden, 1)
        with torch.no_grad():  # seeded init, independent of global RNG state
            for layer in (fc1, fc2):
                bound = 1.0 / np.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
        params = list(fc1.parameters()) + list(fc2.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

        def value(xb):
            return fc2(torch.relu(fc1(xb))).squeeze(-1)

        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, self.batch_size):
                idx = perm[start : start + self.batch_size]
                logits = value(Xs[idx])
                target = yt[idx].clone()
                if self.objective == "td":
                    has_next = nxt[idx] >= 0
                    if has_next.any():
                        with torch.no_grad():
                            target[has_next] = self.gamma * torch.sigmoid(value(Xs[nxt[idx][has_next]]))
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=w[idx])
                loss = loss + self.l1 * fc1.weight.abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.fc1_weight_ = fc1.weight.detach().clone()
        self.fc1_bias_ = fc1.bias.detach().clone()
        self.fc2_weight_ = fc2.weight.detach().reshape(-1).clone()
        self.fc2_bias_ = fc2.bias.detach().reshape(-1).clone()
        return self

    @property
    def neuron_importance_(self) -> np.ndarray:
        return self.fc1_weight_.abs().sum(dim=0).numpy().astype(np.float64)

    def head_params(self) -> dict[str, torch.Tensor]:
        check_is_fitted(self, "fc1_weight_")
        return {
            "fc1.weight": self.fc1_weight_,
            "fc1.bias": self.fc1_bias_,
            "fc2.weight": self.fc2_weight_,
            "fc2.bias": self.fc2_bias_,
        }

    def decision_function(self, X) -> np.ndarray:
        # The same function the runtime uses: fit-time and serve-time logits agree by construction.
        params = self.head_params()
        Xs = torch.tensor(self.standardizer_.transform(np.asarray(X, dtype=np.float64)), dtype=torch.float32)
        return head_logit("mlp", params, Xs).numpy().astype(np.float64)

    def predict_proba(self, X) -> np.ndarray:
        return expit(self.decision_function(X))


class GroupCenteredProbe(BaseEstimator):
    """Ranks the candidates of one group (e.g. several sampled answers to one problem) by a logistic readout of
    their states centred on the group's mean: it learns what separates a problem's right answers from its wrong
    ones, not which problems are easy (which a readout of raw states mostly learns, and which cannot tell a
    problem's candidates apart).

    ``fit(X, y, groups)`` uses the groups that hold both labels; ``decision_function(X)`` scores the rows of *one*
    group (they are centred on their own mean), for ranking only: the scores are not probabilities.
    """

    def __init__(self, *, C: float = 0.01, max_iter: int = 2000):
        self.C, self.max_iter = C, max_iter

    def fit(self, X, y, groups):
        X, y = _check_xy(X, y)
        groups = np.asarray(groups).reshape(-1)
        if len(groups) != len(X):
            raise ValueError(f"length mismatch: {len(X)} rows, {len(groups)} groups")
        self.scale_ = X.std(0) + 1e-6  # over every training row, mixed groups or not
        rows, labels = [], []
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            if 0 < y[idx].mean() < 1:
                rows.append((X[idx] - X[idx].mean(0)) / self.scale_)
                labels.append(y[idx])
        if not rows:
            raise ValueError("no group holds both labels")
        lr = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(np.concatenate(rows), np.concatenate(labels))
        self.coef_ = lr.coef_[0].astype(np.float64)
        self.n_groups_ = len(rows)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = _check_xy(X)
        return ((X - X.mean(0)) / self.scale_) @ self.coef_
