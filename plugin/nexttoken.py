"""The free signal: the next-token distribution at the last prompt token, from the same prefill as the probe.

A prefill computes the logits of the first answer token anyway. Two numbers from it are strong, free
confidence baselines and stacking features:

* multiple choice: max-softmax and entropy of the distribution renormalised over the option letters;
* open questions: max-softmax and entropy of the full vocabulary distribution of the first answer token.

On the device only a short summary per row is computed (vocabulary max-probability, vocabulary entropy and the
log-probabilities of the option letters), so ``2 + letters`` floats per sequence leave it, never the vocabulary.
Fitting (``valueprobe.calibration.extract``) and serving use these same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["KINDS", "summarize_logits", "next_token_features", "prompt_kind"]

KINDS = ("choice", "open")


def summarize_logits(logits: torch.Tensor, letter_ids: Sequence[int]) -> torch.Tensor:
    """``[n, vocab]`` last-position logits -> ``[n, 2 + len(letter_ids)]`` CPU float32 summary.

    Columns: vocabulary max-probability, vocabulary entropy (nats), then the log-probability of each letter.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    probs = logprobs.exp()
    vocab_max = probs.max(dim=-1).values
    vocab_entropy = torch.special.entr(probs).sum(dim=-1)  # entr(0) = 0: no 0 * log 0 NaNs
    letters = logprobs[:, torch.as_tensor(list(letter_ids), dtype=torch.long, device=logits.device)]
    return torch.cat([vocab_max[:, None], vocab_entropy[:, None], letters], dim=1).detach().to("cpu", torch.float32)


def next_token_features(summary: np.ndarray | torch.Tensor, kind: str, n_choices: int = 0) -> tuple[float, float, int]:
    """One row of :func:`summarize_logits` -> ``(max_softmax, entropy, argmax)`` for a prompt of ``kind``.

    For ``"choice"`` the distribution is renormalised over the first ``n_choices`` letters and ``argmax`` is the
    chosen option; for ``"open"`` it is the vocabulary distribution (``argmax`` is -1: the token is not kept).
    """
    row = np.asarray(summary, dtype=np.float64).reshape(-1)
    if kind == "choice":
        if not 1 <= n_choices <= row.size - 2:
            raise ValueError(f"n_choices must be in 1..{row.size - 2}, got {n_choices}")
        lp = row[2 : 2 + n_choices]
        p = np.exp(lp - lp.max())
        p /= p.sum()
        entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        return float(p.max()), entropy, int(p.argmax())
    if kind == "open":
        return float(row[0]), float(row[1]), -1
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def prompt_kind(prompt) -> tuple[str, int]:
    """``("choice", n)`` for a ``{"question", "choices"}`` prompt with ``n`` choices, else ``("open", 0)``
    (question strings and chat conversations)."""
    if isinstance(prompt, dict) and prompt.get("choices"):
        return "choice", len(prompt["choices"])
    return "open", 0
