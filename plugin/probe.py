"""``ValueProbe``: load an artifact, attach it to a model, score prompts.

Example
-------
>>> from valueprobe.plugin import ValueProbe, load_model                      # doctest: +SKIP
>>> model, tokenizer = load_model("Qwen2.5-Coder-1.5B-Instruct")
>>> probe = ValueProbe.load("weights/qwen2.5-coder-1.5b-instruct.safetensors")
>>> [r.probability for r in probe.score(model, tokenizer, ["What is the capital of Peru?"])]
[0.71]
>>> handle = probe.attach(model, tokenizer)          # confidence inside generate(), no extra forward pass
>>> out = model.generate(**batch, max_new_tokens=20)
>>> handle.latest                                    # one ProbeResult per sequence of the prefill
>>> handle.remove()
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .artifact import (
    ArtifactData,
    ArtifactMismatchError,
    FingerprintMismatchError,
    calibrator_arrays,
    head_tensors,
    load_artifact,
    save_artifact,
)
from .fingerprint import diff_fingerprints, model_fingerprint, tokenizer_fingerprint
from .hooks import LastTokenReader, capture, find_decoder_layers, with_position_ids
from .prompting import Prompt, PromptFormat
from .readout import calibrate, head_logit

__all__ = ["ValueProbe", "ProbeResult", "ProbeHandle"]


@dataclass(frozen=True)
class ProbeResult:
    """Confidence for one prompt: ``raw`` is the head's logit, ``probability`` the calibrated P(correct)."""

    raw: float
    probability: float


class ProbeHandle:
    """A probe attached to a model. Every prefill (a forward with an empty KV cache) is scored.

    ``latest`` holds the results of the most recent prefill; ``consume()`` returns and clears every batch
    recorded since the last call. ``on_score`` (if given to ``attach``) is called with each batch's results.
    Use as a context manager or call ``remove()``; removing twice is harmless.
    """

    def __init__(self, probe: ValueProbe, model, on_score: Callable[[list[ProbeResult]], None] | None):
        self.probe = probe
        self._on_score = on_score
        self._lock = threading.Lock()
        self._batches: list[list[ProbeResult]] = []
        self.latest: list[ProbeResult] = []
        self._reader = LastTokenReader(
            model, [probe.layer], self._record, neuron_indices=probe.neuron_indices
        ).register()

    def _record(self, values: dict[int, torch.Tensor]) -> None:
        results = self.probe.readout(values[self.probe.layer])
        with self._lock:
            self.latest = results
            self._batches.append(results)
        if self._on_score is not None:
            self._on_score(results)

    def consume(self) -> list[list[ProbeResult]]:
        with self._lock:
            batches, self._batches = self._batches, []
        return batches

    def remove(self) -> None:
        self._reader.remove()

    @property
    def attached(self) -> bool:
        return self._reader.registered

    def __enter__(self) -> ProbeHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class ValueProbe:
    """A fitted value-neuron probe, as read from an artifact.

    Attributes
    ----------
    layer: int
        1-based hooked layer (``hidden_states[layer]``).
    neuron_indices: torch.Tensor
        ``[k]`` int64 hidden units read.
    head: str
        ``"linear"`` or ``"mlp"``: the head that produces ``raw``.
    prompt_format: PromptFormat
        The format ``fit`` used; ``score`` re-applies it.
    """

    def __init__(self, data: ArtifactData):
        self.data = data
        md = data.metadata
        self.model_name = md["model_name"]
        self.layer = int(md["layer"])
        self.hidden_size = int(md["hidden_size"])
        self.head = md["head"]
        self.calibrator = md["calibrator"]
        self.neuron_indices = data.tensors["neurons.indices"]
        self.mean = data.tensors["features.mean"].to(torch.float32)
        self.scale = data.tensors["features.scale"].to(torch.float32)
        self._head_params = head_tensors(data, self.head)
        self._calibrator_params = calibrator_arrays(data)
        self.prompt_format = PromptFormat.from_json(md["prompt_format"])
        self.model_fingerprint = data.json("model_fingerprint")
        self.tokenizer_fingerprint = data.json("tokenizer_fingerprint")
        self.thresholds = data.json("thresholds", {})
        self.eval_card = data.json("eval_card", {})
        # Models already checked (hashing a layer's weights costs ~0.1-0.5 s on a 1.5B model: do it once).
        self._verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- I/O ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> ValueProbe:
        """Read and validate an artifact (see :mod:`valueprobe.plugin.artifact`)."""
        return cls(load_artifact(path))

    def save(self, path) -> str:
        return save_artifact(self.data, path)

    @property
    def k(self) -> int:
        return int(self.neuron_indices.numel())

    @property
    def artifact_id(self) -> str:
        """Short content hash: names this exact artifact in logs, metrics and API responses."""
        return self.data.metadata["content_sha256"][:12]

    # -- readout -----------------------------------------------------------------------------------------------
    def raw_scores(self, values: torch.Tensor) -> np.ndarray:
        """``[n, k]`` neuron values (in ``neuron_indices`` order) -> ``[n]`` raw logits."""
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.dim() != 2 or values.shape[1] != self.k:
            raise ValueError(f"expected values of shape [n, {self.k}], got {tuple(values.shape)}")
        standardized = (values - self.mean) / self.scale
        return head_logit(self.head, self._head_params, standardized).numpy().astype(np.float64)

    def predict_proba(self, values: torch.Tensor) -> np.ndarray:
        """``[n, k]`` neuron values -> ``[n]`` calibrated P(correct)."""
        return calibrate(self.calibrator, self._calibrator_params, self.raw_scores(values))

    def readout(self, values: torch.Tensor) -> list[ProbeResult]:
        raw = self.raw_scores(values)
        prob = calibrate(self.calibrator, self._calibrator_params, raw)
        return [ProbeResult(float(r), float(p)) for r, p in zip(raw, prob)]

    # -- model binding -------------------------------------------------------------------------------------------
    def check_compatible(self, model, tokenizer=None, *, strict: bool = True) -> list[str]:
        """Compare the model (and tokenizer) with the fingerprints recorded at fit time.

        Returns the mismatched field names. With ``strict=True`` a mismatch raises
        :class:`FingerprintMismatchError`; with ``strict=False`` it warns and returns them.
        """
        cached = self._verified.get(model)
        if cached is not None and (tokenizer is None or id(tokenizer) in cached):
            return []
        decoder = find_decoder_layers(model)
        if self.layer > len(decoder):
            raise ArtifactMismatchError(
                f"artifact reads layer {self.layer} but the model has {len(decoder)} layers"
            )
        mismatched = diff_fingerprints(self.model_fingerprint, model_fingerprint(model, self.layer))
        if tokenizer is not None:
            mismatched += [
                f"tokenizer.{f}" for f in diff_fingerprints(self.tokenizer_fingerprint, tokenizer_fingerprint(tokenizer))
            ]
        if mismatched:
            message = (
                f"model fingerprint mismatch for artifact fitted on {self.model_name!r} (layer {self.layer}): "
                f"fields differ: {', '.join(mismatched)}. Fit an artifact for this model with `valueprobe fit`, "
                "or pass check_fingerprint=False to attach anyway (scores will be meaningless)."
            )
            if strict:
                raise FingerprintMismatchError(message, mismatched)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return mismatched
        # Footgun: weights changed in place after this check are not re-hashed.
        self._verified.setdefault(model, set()).add(id(tokenizer) if tokenizer is not None else None)
        return mismatched

    def attach(
        self,
        model,
        tokenizer=None,
        *,
        check_fingerprint: bool = True,
        on_score: Callable[[list[ProbeResult]], None] | None = None,
    ) -> ProbeHandle:
        """Register the forward hook; every later prefill of ``model`` is scored (decode steps are skipped).

        Raises :class:`FingerprintMismatchError` for another checkpoint or tokenizer unless
        ``check_fingerprint=False`` (which warns instead).
        """
        self.check_compatible(model, tokenizer, strict=check_fingerprint)
        return ProbeHandle(self, model, on_score)

    def encode(self, tokenizer, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Render ``prompts`` with the artifact's prompt format and tokenize them, left-padded."""
        return self.prompt_format.tokenize(tokenizer, [self.prompt_format.render(tokenizer, p) for p in prompts])

    @torch.inference_mode()
    def score(
        self,
        model,
        tokenizer,
        prompts: Prompt | Sequence[Prompt],
        *,
        batch_size: int = 8,
        check_fingerprint: bool = True,
    ) -> list[ProbeResult]:
        """Prompt-only confidence: one prefill per batch, no generation. One result per prompt, in order.

        ``prompts`` is one prompt or a list; each is a question string, a ``{"question", "choices"}`` dict or a
        list of chat messages (see :mod:`valueprobe.plugin.prompting`). The forward pass stops right after the
        hooked layer, so later layers and the LM head are not computed.
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict) and "role" in prompts[0]
        ):
            prompts = [prompts]
        self.check_compatible(model, tokenizer, strict=check_fingerprint)
        device = next(model.parameters()).device
        results: list[ProbeResult] = []
        for start in range(0, len(prompts), batch_size):
            batch = self.encode(tokenizer, prompts[start : start + batch_size]).to(device)
            with capture(model, [self.layer], self.neuron_indices, stop_after=True) as cap:
                model(**with_position_ids(batch), use_cache=False)
            results.extend(self.readout(cap.batches[0][self.layer]))
        return results
