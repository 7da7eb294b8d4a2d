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

import json
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .artifact import (
    ANSWER_END,
    TOKEN_POSITION,
    ArtifactData,
    ArtifactMismatchError,
    FingerprintMismatchError,
    calibrator_arrays,
    head_tensors,
    load_artifact,
    save_artifact,
    stack_arrays,
)
from .fingerprint import (
    describe_mismatch,
    diff_fingerprints,
    library_versions,
    model_fingerprint,
    tokenizer_fingerprint_like,
)
from .hooks import Hooks, LastTokenReader, capture, find_decoder_layers, with_position_ids
from .nexttoken import next_token_features, prompt_kind
from .prompting import Prompt, PromptFormat
from .readout import ANSWER_STACK_FEATURES, answer_columns, calibrate, pool_answer, compose_maps, head_logit, mahalanobis, stack_features, stack_proba

__all__ = ["ValueProbe", "ProbeResult", "ProbeHandle", "answer_end_column"]


def answer_end_column(answer_tokens: int, forwards: int) -> int | None:
    """Which recorded forward holds the state at the answer's last token, when a generation recorded the last
    column of every forward (:class:`~valueprobe.plugin.hooks.StepStateRecorder`: column 0 is the prompt's last
    token, column ``j`` the forward that fed generated token ``j - 1``). An answer of ``n`` tokens (before the
    end-of-answer token) ends at column ``n``: the decode step that takes its last token as input, the one that
    emits the end of the answer. ``None`` when that forward never ran: the answer stopped at the token limit, so
    its last token was never fed back (one more step gives it). An empty answer reads the prompt's last token."""
    return answer_tokens if answer_tokens < forwards else None



def _versions(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "unknown versions"


class _NoTokenizer:
    """Key for a check made without a tokenizer (weak-referenceable, unlike None)."""


_NO_TOKENIZER = _NoTokenizer()


@dataclass(frozen=True)
class ProbeResult:
    """Confidence for one prompt.

    ``probability`` is the served, calibrated P(correct): the stacked score of the prompt's ``kind`` when the
    artifact serves one (``served_score == "stacked"``), else the value neurons' calibrated probability. ``raw``
    is the value head's logit. ``components`` holds each part (``value_probability``, ``max_softmax``,
    ``entropy``); ``ood_distance`` / ``ood`` say how far the prompt's neuron values lie from the fitting data
    (``None`` when the artifact carries no OOD model). A prompt whose hidden state is not finite (a float16
    overflow) gets NaN ``raw`` and ``probability``, row by row, like any numeric library; check
    ``math.isfinite(result.probability)`` before acting on it (the sidecar refuses to serve such a row).
    """

    raw: float
    probability: float
    kind: str = "open"
    components: dict = field(default_factory=dict, compare=False)
    ood_distance: float | None = None
    ood: bool | None = None


class ProbeHandle(Hooks):
    """A probe's hooks on a model: while entered, every prefill (a forward with an empty KV cache) is scored.

    ``latest`` holds the results of the most recent prefill; ``consume()`` returns and clears every batch
    recorded since the last call. ``on_score`` (if given) is called with each batch's results. Registers in
    ``__enter__`` and removes in ``__exit__`` like every hook object (:class:`~valueprobe.plugin.hooks.Hooks`);
    :meth:`ValueProbe.attach` hands it back already entered, so ``remove()`` (harmless twice) ends it too.

    ``thread_only`` scores only forwards run by the thread that entered it (the sidecar's generation thread, while
    another thread scores prompts on the same model). A readout that raises inside the forward pass is raised out
    of it, unless ``on_error`` is given: then it is passed there and the forward goes on (a server ends that
    request, not the batch).
    """

    def __init__(self, probe: ValueProbe, model, on_score: Callable[[list[ProbeResult]], None] | None = None,
                 letter_ids=None, *, thread_only: bool = False,
                 on_error: Callable[[Exception], None] | None = None):
        self.probe = probe
        self._on_score, self._on_error = on_score, on_error
        self._lock = threading.Lock()
        self._batches: list[list[ProbeResult]] = []
        self._handles: list = []
        self.latest: list[ProbeResult] = []
        #: Kinds of the rows of the next prefill (``[("choice", n_choices) | ("open", 0)]``); open by default.
        #: Set it (or use ``probe.encode(..., handle=handle)``) before a multiple-choice ``generate``.
        self.kinds: list[tuple[str, int]] | None = None
        self._reader = LastTokenReader(
            model, [probe.layer], self._record, neuron_indices=probe.neuron_indices,
            next_token_ids=letter_ids if probe.needs_next_token else None, thread_only=thread_only,
        )

    def _register(self) -> list:
        return [self._reader.__enter__()]  # the reader's remove() is this handle's

    def _record(self, values: dict[int, torch.Tensor]) -> None:
        try:
            results = self.probe.readout(values[self.probe.layer], values.get("next_token"), self.kinds)
        except Exception as exc:
            if self._on_error is None:
                raise
            self._on_error(exc)
            return
        with self._lock:
            self.latest = results
            self._batches.append(results)
        if self._on_score is not None:
            self._on_score(results)

    def consume(self) -> list[list[ProbeResult]]:
        with self._lock:
            batches, self._batches = self._batches, []
        return batches

    @property
    def attached(self) -> bool:
        return self.registered


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
        self.served_score = md.get("served_score", "value")
        #: answer_end artifacts: which read of the answer the head takes (``last`` token or ``mean`` of its tokens)
        self.answer_read = md.get("answer_read", "last")
        #: the stacker's columns (the answer-side ones after the three prompt columns are built per answer)
        self.stack_columns = tuple(data.json("stack_features", []))
        self._stack = stack_arrays(data)
        self._ood = None
        if "ood.mean" in data.tensors:
            self._ood = (data.tensors["ood.mean"].numpy(), data.tensors["ood.precision"].numpy(),
                         float(data.tensors["ood.threshold"].reshape(-1)[0]))
        self.prompt_format = PromptFormat.from_json(md["prompt_format"])
        #: ``last_prompt_token`` (confidence in a prompt) or ``step_end`` (a value over reasoning steps)
        self.token_position = md.get("token_position", TOKEN_POSITION)
        self.model_fingerprint = data.json("model_fingerprint")
        self.tokenizer_fingerprint = data.json("tokenizer_fingerprint")
        self.thresholds = data.json("thresholds", {})
        self.eval_card = data.json("eval_card", {})
        # parsed once: the sidecar undoes these maps for every request it scores (origin_maps)
        self._origin_maps = {slot: (float(a), float(b)) for slot, (a, b)
                             in data.json("recalibration", {}).get("from_origin", {}).items()}
        # Models already checked (hashing a layer's weights costs ~0.1-0.5 s on a 1.5B model: do it once).
        self._verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # ... and those that did not match: model -> {tokenizer: {fields, refusal, warning, warned}}, so a caller who
        # opted out (check_fingerprint=False) pays the hash and the warning once, not on every call
        self._mismatches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- I/O ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> ValueProbe:
        """Read and validate an artifact (see :mod:`valueprobe.plugin.artifact`)."""
        return cls(load_artifact(path))

    def save(self, path) -> str:
        return save_artifact(self.data, path)

    @property
    def stack_kinds(self) -> list[str]:
        """Question kinds with a stacker (value neurons + next-token signal), sorted."""
        return sorted(self._stack)

    @property
    def ood_threshold(self) -> float | None:
        """Mahalanobis distance above which a prompt is flagged out of distribution (``None``: no OOD model)."""
        return None if self._ood is None else self._ood[2]

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

    @property
    def needs_next_token(self) -> bool:
        """Whether the served score reads the next-token distribution of the prefill (stacked artifacts)."""
        return self.served_score == "stacked"

    def letter_ids(self, tokenizer) -> list[int]:
        return self.prompt_format.letter_token_ids(tokenizer, len(self.prompt_format.letters))

    def predict(self, values, max_softmax=None, entropy=None, kinds=None, extra=None) -> dict[str, np.ndarray]:
        """Vectorised served numbers for ``[n, k]`` neuron values and, for stacked artifacts, each row's
        next-token ``max_softmax`` and ``entropy`` (as :func:`~valueprobe.plugin.nexttoken.next_token_features`
        gives them) and ``kinds`` (``"choice"`` / ``"open"`` per row). Returns arrays ``value_raw``,
        ``value_probability``, ``probability`` (the served score) and, with an OOD model, ``ood_distance`` and
        ``ood``."""
        raw = self.raw_scores(values)
        value_p = calibrate(self.calibrator, self._calibrator_params, raw)
        prob = value_p.copy()
        if self.served_score == "stacked" and max_softmax is not None:
            kinds = np.asarray(kinds if kinds is not None else ["open"] * len(raw))
            for kind, params in self._stack.items():
                m = kinds == kind
                if m.any():
                    prob[m] = stack_proba(params, stack_features(
                        raw[m], np.asarray(max_softmax)[m], np.asarray(entropy)[m],
                        None if extra is None else np.asarray(extra, dtype=np.float64)[m]))
        out = {"value_raw": raw, "value_probability": value_p, "probability": prob}
        if self._ood is not None:
            dist = mahalanobis(torch.as_tensor(values, dtype=torch.float64).numpy(), self._ood[0], self._ood[1])
            out.update(ood_distance=dist, ood=dist > self._ood[2])
        return out

    def readout(self, values: torch.Tensor, next_token: torch.Tensor | None = None,
                kinds: Sequence[tuple[str, int]] | None = None) -> list[ProbeResult]:
        """``[n, k]`` neuron values (and, for stacked artifacts, the ``[n, 2 + letters]`` next-token summary of
        the same prefill) -> one :class:`ProbeResult` per row. ``kinds`` gives each row's ``(kind, n_choices)``;
        rows default to open questions."""
        n = int(torch.as_tensor(values).shape[0])
        kinds = list(kinds) if kinds is not None else [("open", 0)] * n
        if len(kinds) != n:
            raise ValueError(f"{len(kinds)} kinds for {n} rows")
        ms = ent = None
        if next_token is not None:
            feats = [next_token_features(next_token[i], kind, n_choices) for i, (kind, n_choices) in enumerate(kinds)]
            ms, ent = np.array([f[0] for f in feats]), np.array([f[1] for f in feats])
        pred = self.predict(values, ms, ent, [k for k, _ in kinds])
        out = []
        for i in range(n):
            comps = {"value_raw": float(pred["value_raw"][i]), "value_probability": float(pred["value_probability"][i])}
            if ms is not None:
                comps.update(max_softmax=float(ms[i]), entropy=float(ent[i]))
            dist = pred.get("ood_distance")
            out.append(ProbeResult(float(pred["value_raw"][i]), float(pred["probability"][i]), kinds[i][0], comps,
                                   None if dist is None else float(dist[i]),
                                   None if dist is None else bool(pred["ood"][i])))
        return out

    def readout_answer(self, values: torch.Tensor, token_logprobs: Sequence[Sequence[float]],
                       next_token: torch.Tensor | None, kinds: Sequence[tuple[str, int]] | None = None, *,
                       prompt_signals: tuple[Sequence[float], Sequence[float]] | None = None,
                       read_at: Sequence[str] | None = None) -> list[ProbeResult]:
        """Confidence in given answers (an ``answer_end`` artifact): ``[n, k]`` neuron values of each answer as the
        artifact reads it (:attr:`answer_read`: at its last token, or averaged over its tokens by
        :func:`~valueprobe.plugin.readout.pool_answer`), each answer's token log-probabilities and the ``[n, 2 + letters]`` next-token summary at the
        prompt's end (:func:`~valueprobe.plugin.nexttoken.summarize_logits`), all from the same generation (the
        free signals the stack uses) -> one :class:`ProbeResult` per answer, whose ``components`` hold
        ``value_raw``, ``value_probability``, ``max_softmax``, ``entropy``, ``mean_token_logprob``,
        ``min_token_logprob`` and ``answer_tokens``. ``kinds``: each prompt's ``(kind, n_choices)``. In place of
        the summary, ``prompt_signals`` may give each prompt's ``(max_softmax, entropy)`` as a prompt-level
        readout's components hold them. ``read_at`` (one per answer, recorded in ``components["read_at"]``) says
        where the values were read: ``"last_token"`` (the state the answer's last token computes, as fitting reads
        it) or ``"before_last_token"`` (an engine that never feeds back its last sampled token, at the token limit);
        default ``"last_token"``."""
        self.require_position(ANSWER_END)
        n = int(torch.as_tensor(values).shape[0])
        kinds = list(kinds) if kinds is not None else [("open", 0)] * n
        if len(kinds) != n or len(token_logprobs) != n:
            raise ValueError(f"{len(kinds)} kinds and {len(token_logprobs)} answers for {n} rows")
        if prompt_signals is not None:
            ms, ent = (np.asarray(x, dtype=np.float64).reshape(-1) for x in prompt_signals)
        else:
            prompt = [next_token_features(next_token[i], kind, n) for i, (kind, n) in enumerate(kinds)]
            ms, ent = np.array([f[0] for f in prompt]), np.array([f[1] for f in prompt])
        names = (self.stack_columns or ANSWER_STACK_FEATURES)[3:]
        signals = np.array([answer_columns(names, lp, options if kind == "choice" else 0)
                            for lp, (kind, options) in zip(token_logprobs, kinds)],
                           dtype=np.float64).reshape(-1, len(names))
        pred = self.predict(values, ms, ent, [k for k, _ in kinds], extra=signals)
        out = []
        for i, lp in enumerate(token_logprobs):
            lp = [float(x) for x in lp]
            comps = {"value_raw": float(pred["value_raw"][i]), "value_probability": float(pred["value_probability"][i]),
                     "max_softmax": float(ms[i]), "entropy": float(ent[i]),
                     "mean_token_logprob": float(np.mean(lp)) if lp else None,
                     "min_token_logprob": min(lp) if lp else None, "answer_tokens": len(lp),
                     "read_at": read_at[i] if read_at is not None else "last_token"}
            dist = pred.get("ood_distance")
            out.append(ProbeResult(float(pred["value_raw"][i]), float(pred["probability"][i]), kinds[i][0], comps,
                                   None if dist is None else float(dist[i]),
                                   None if dist is None else bool(pred["ood"][i])))
        return out

    # -- model binding -------------------------------------------------------------------------------------------
    def require_position(self, expected: str) -> None:
        """Refuse, naming ``token_position``, an artifact read at another position than the one this use needs
        (a step value scoring prompts, or a prompt confidence valuing reasoning steps)."""
        if self.token_position != expected:
            raise ArtifactMismatchError(
                f"artifact {self.artifact_id} has token_position {self.token_position!r}; this use needs {expected!r} "
                "(last_prompt_token: confidence in a prompt, from `valueprobe fit --data`; step_end: a value over "
                "reasoning steps, from `valueprobe fit-steps`)")

    @property
    def fingerprint_scheme(self) -> str:
        """Scheme of the recorded tokenizer fingerprint: ``"1"`` (attribute values; re-stamp with
        ``valueprobe restamp``) or ``"2"`` (what decides the token ids)."""
        return self.tokenizer_fingerprint.get("scheme", "1")

    def fingerprint_mismatch(self, model_fields: dict[str, str], tokenizer=None) -> tuple[list[str], str]:
        """Compare a model fingerprint (as :func:`~valueprobe.plugin.fingerprint.model_fingerprint` or the vLLM
        worker computes it) and a tokenizer with the ones recorded at fit time.

        Returns the mismatched field names (tokenizer fields prefixed ``tokenizer.``) and, when there are any, a
        message that gives each field's expected and found value, the library versions on each side and what to do.
        """
        mismatched = diff_fingerprints(self.model_fingerprint, model_fields)
        clauses = [describe_mismatch(mismatched, self.model_fingerprint, model_fields)] if mismatched else []
        tok_fields: list[str] = []
        if tokenizer is not None:
            found = tokenizer_fingerprint_like(self.tokenizer_fingerprint, tokenizer, self.prompt_format)
            tok_fields = diff_fingerprints(self.tokenizer_fingerprint, found)
            if tok_fields:
                clauses.append(describe_mismatch([f"tokenizer.{f}" for f in tok_fields],
                                                 {f"tokenizer.{k}": v for k, v in self.tokenizer_fingerprint.items()},
                                                 {f"tokenizer.{k}": v for k, v in found.items()}))
        mismatched += [f"tokenizer.{f}" for f in tok_fields]
        if not mismatched:
            return [], ""
        stamped = self.data.json("library_versions")
        versions = (f"The artifact was stamped with {_versions(stamped)}" if stamped
                    else "The artifact records no library versions (stamped before valueprobe recorded them)")
        what = (f"model fingerprint mismatch for artifact fitted on {self.model_name!r} (layer {self.layer}): "
                f"fields differ: {'; '.join(clauses)}. {versions}; this process runs {_versions(library_versions())}.")
        if tok_fields and self.fingerprint_scheme == "1" and not set(mismatched) - {"tokenizer.special_tokens_sha256"}:
            what += (" This artifact records a scheme-1 tokenizer fingerprint, which hashed special-token attributes "
                     "that transformers releases convert differently from the same checkpoint. If it is the model "
                     "the artifact was fitted on, `valueprobe restamp ARTIFACT` checks the vocabulary, chat template "
                     "and layer weights and records a scheme-2 fingerprint (what decides the token ids).")
        else:
            what += " Fit an artifact for this model with `valueprobe fit`."
        return mismatched, what

    def restamped(self, model, tokenizer) -> ValueProbe:
        """This artifact with its tokenizer fingerprint recorded in the current scheme (``valueprobe restamp``).

        Only for the checkpoint it was fitted on: the model fingerprint (config and layer weights) must match, and a
        scheme-1 stamp must match on everything that decided the token ids (vocabulary and chat template); only
        the special-token attributes that transformers releases reinterpret may differ. Tensors, card and
        thresholds are kept; ``restamped_from`` records the replaced ``content_sha256``. Save the result with
        :meth:`save`. Raises :class:`FingerprintMismatchError` naming the fields that forbid it.
        """
        from .fingerprint import legacy_tokenizer_fingerprint, stamp_metadata

        model_fields = model_fingerprint(model, self.layer)
        mismatched = diff_fingerprints(self.model_fingerprint, model_fields)
        if self.fingerprint_scheme == "1":
            legacy = legacy_tokenizer_fingerprint(tokenizer)
            mismatched += [f"tokenizer.{f}" for f in diff_fingerprints(self.tokenizer_fingerprint, legacy)
                           if f != "special_tokens_sha256"]
        else:
            mismatched += self.fingerprint_mismatch(model_fields, tokenizer)[0]
        if mismatched:
            _, what = self.fingerprint_mismatch(model_fields, tokenizer)
            raise FingerprintMismatchError(f"cannot re-stamp: not the checkpoint this artifact was fitted on. {what}",
                                           sorted(set(mismatched)))
        stamp = stamp_metadata(model, tokenizer, self.layer, self.prompt_format)
        metadata = dict(self.data.metadata)
        metadata.update(tokenizer_fingerprint=stamp["tokenizer_fingerprint"],
                        chat_template_sha256=stamp["chat_template_sha256"],
                        library_versions=stamp["library_versions"],
                        restamped_from=self.data.metadata["content_sha256"])
        return ValueProbe(ArtifactData(dict(self.data.tensors), metadata))

    # -- recalibration from feedback ------------------------------------------------------------------------------
    @property
    def calibration_version(self) -> int:
        """0 for a fitted artifact; each promoted recalibration (:meth:`recalibrated`) adds one."""
        return int(self.data.metadata.get("calibration_version", "0"))

    @property
    def calibration_origin(self) -> str:
        """``content_sha256`` of the fitted artifact this one descends from by recalibration (itself if none)."""
        return self.data.metadata.get("calibration_origin", self.data.metadata["content_sha256"])

    def calibration_slot(self, kind: str) -> str:
        """The calibrator whose output is the served probability of a ``kind`` prompt: the kind's stacker
        (``"choice"`` / ``"open"``) or the value calibrator (``"value"``)."""
        return kind if self.served_score == "stacked" and kind in self._stack else "value"

    def origin_maps(self) -> dict[str, tuple[float, float]]:
        """Per slot ``(a, b)`` with ``logit(p_served) = a * logit(p_fitted) + b``: what the promoted recalibrations
        did to the fitted artifact's probability (identity when there were none)."""
        return dict(self._origin_maps)

    def recalibrated(self, maps: dict[str, tuple[float, float]], record: dict | None = None) -> ValueProbe:
        """This artifact with a Platt map ``p -> sigmoid(a * logit(p) + b)`` applied after the served probability
        of each slot in ``maps`` (see :meth:`calibration_slot`), composed into the slot's own Platt parameters so
        the readout path is unchanged: ``a' = a * a_old``, ``b' = a * b_old + b``. A temperature or identity value
        calibrator becomes Platt; an isotonic one cannot take the map (refit instead: ``ValueError``).
        ``calibration_version`` goes up by one, ``recalibrated_from`` names the replaced ``content_sha256``,
        ``calibration_origin`` the fitted artifact, and ``recalibration`` (JSON) holds ``record`` plus the maps from
        the fitted artifact. Save the result with :meth:`save` (a new ``content_sha256``)."""
        tensors, metadata = dict(self.data.tensors), dict(self.data.metadata)
        origin = self.origin_maps()
        for slot, (a, b) in maps.items():
            if not (np.isfinite(a) and np.isfinite(b) and a > 0):
                raise ValueError(f"recalibration of {slot!r} needs a finite positive slope, got a={a}, b={b}")
            if slot in self._stack:
                names = (f"stack.{slot}.calibrator.a", f"stack.{slot}.calibrator.b")
            elif slot == "value":
                kind = metadata["calibrator"]
                if kind == "isotonic":
                    raise ValueError("the value calibrator is isotonic: a Platt map cannot be composed into it; "
                                     "refit the artifact on the new data instead")
                if kind != "platt":
                    a_old = 1.0 / float(tensors.pop("calibrator.temperature").reshape(-1)[0]) if kind == "temperature" else 1.0
                    tensors["calibrator.a"] = torch.tensor([a_old], dtype=torch.float64)
                    tensors["calibrator.b"] = torch.tensor([0.0], dtype=torch.float64)
                    metadata["calibrator"] = "platt"
                names = ("calibrator.a", "calibrator.b")
            else:
                raise ValueError(f"unknown calibration slot {slot!r}; this artifact has {sorted(self._stack) + ['value']}")
            a_new, b_new = compose_maps((a, b), tuple(float(tensors[n].reshape(-1)[0]) for n in names))
            dtype = tensors[names[0]].dtype
            tensors[names[0]] = torch.tensor([a_new], dtype=dtype)
            tensors[names[1]] = torch.tensor([b_new], dtype=dtype)
            origin[slot] = compose_maps((a, b), origin.get(slot, (1.0, 0.0)))
        metadata.update(calibration_version=str(self.calibration_version + 1),
                        recalibrated_from=self.data.metadata["content_sha256"],
                        calibration_origin=self.calibration_origin,
                        recalibration=json.dumps({**(record or {}), "maps": {s: list(m) for s, m in maps.items()},
                                                  "from_origin": {s: list(m) for s, m in origin.items()}},
                                                 sort_keys=True))
        return ValueProbe(ArtifactData(tensors, metadata))

    def check_compatible(self, model, tokenizer=None, *, strict: bool = True) -> list[str]:
        """Compare the model (and tokenizer) with the fingerprints recorded at fit time.

        Returns the mismatched field names. With ``strict=True`` a mismatch raises
        :class:`FingerprintMismatchError`; with ``strict=False`` it warns and returns them.
        """
        cached = self._verified.get(model)
        if cached is not None and (tokenizer is None or tokenizer in cached):
            return []
        known = self._mismatches.get(model, {}).get(tokenizer if tokenizer is not None else _NO_TOKENIZER)
        if known is not None:
            if strict:
                raise FingerprintMismatchError(known["refusal"], list(known["fields"]))
            if not known["warned"]:
                known["warned"] = True
                warnings.warn(known["warning"], RuntimeWarning, stacklevel=3)
            return list(known["fields"])
        decoder = find_decoder_layers(model)
        if self.layer > len(decoder):
            raise ArtifactMismatchError(
                f"artifact reads layer {self.layer} but the model has {len(decoder)} layers"
            )
        mismatched, what = self.fingerprint_mismatch(model_fingerprint(model, self.layer), tokenizer)
        if mismatched:
            hint = ""
            if "layer_weights_fp16_sha256" in mismatched and "layer_weights_fp16_sha256" not in self.model_fingerprint:
                hint = (" This artifact records no float16 weight hash (fitted before valueprobe recorded one):"
                        " load the model in bfloat16 or float32, or refit it.")
            # the refusal advises opting out; the opt-out's warning says it was done
            refusal = what + " Or pass check_fingerprint=False to attach anyway (scores will be meaningless)." + hint
            warning = (what + " Attached anyway (check_fingerprint=False): its scores are meaningless for this model."
                       + hint)
            self._mismatches.setdefault(model, weakref.WeakKeyDictionary())[
                tokenizer if tokenizer is not None else _NO_TOKENIZER] = {
                    "fields": tuple(mismatched), "refusal": refusal, "warning": warning, "warned": not strict}
            if strict:
                raise FingerprintMismatchError(refusal, mismatched)
            warnings.warn(warning, RuntimeWarning, stacklevel=3)
            return mismatched
        # Footgun: weights changed in place after this check are not re-hashed. Tokenizers are held weakly (not
        # by id(): ids are reused after garbage collection, so a new tokenizer could pass unchecked).
        checked = self._verified.setdefault(model, weakref.WeakSet())
        if tokenizer is not None:
            checked.add(tokenizer)
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
        Returns the entered :class:`ProbeHandle`: use it as ``with probe.attach(...) as handle:`` or call
        ``handle.remove()``.

        Raises :class:`FingerprintMismatchError` for another checkpoint or tokenizer unless
        ``check_fingerprint=False`` (which warns instead); :class:`ArtifactMismatchError` for a step-value artifact.
        """
        self.require_position(TOKEN_POSITION)
        self.check_compatible(model, tokenizer, strict=check_fingerprint)
        if self.needs_next_token and tokenizer is None:
            raise ValueError("this artifact serves a stacked score: attach(model, tokenizer) needs the tokenizer "
                             "to find the option-letter tokens")
        letters = self.letter_ids(tokenizer) if tokenizer is not None else None
        return ProbeHandle(self, model, on_score, letters).__enter__()

    @torch.inference_mode()
    def prefill(self, model, batch, letter_ids: Sequence[int] | None = None, *, thread_only: bool = False):
        """One forward pass of an encoded, left-padded ``batch``; returns what the hooks read, ``{layer: [n, k]}``
        plus ``"next_token"`` when ``letter_ids`` is given (stacked artifacts), or ``None`` if no prefill ran.

        Without ``letter_ids`` the pass stops right after the hooked layer; with them it runs to the LM head,
        computing only the last position's logits. ``thread_only``: see :class:`~valueprobe.plugin.hooks.LastTokenReader`.
        """
        with capture(model, [self.layer], self.neuron_indices, stop_after=letter_ids is None,
                     next_token_ids=letter_ids, thread_only=thread_only) as cap:
            model(**with_position_ids(batch), use_cache=False, **({"logits_to_keep": 1} if letter_ids else {}))
        return cap.batches[0] if cap.batches else None

    def encode(self, tokenizer, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Render ``prompts`` with the artifact's prompt format and tokenize them, left-padded."""
        return self.prompt_format.tokenize(tokenizer, [self.prompt_format.render(tokenizer, p) for p in prompts])

    @torch.inference_mode()
    def read_answers(self, model, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                     kinds: Sequence[tuple[str, int]], *, letter_ids: Sequence[int], pad_id: int,
                     thread_only: bool = False) -> list[ProbeResult]:
        """Confidence in given answers (an ``answer_end`` artifact) from token ids: one prefill of each prompt +
        answer, left-padded in one batch, the artifact's layer read at each answer's last token, the answer's token
        log-probabilities and the prompt's next-token distribution (the column that predicts the answer's first
        token) from the same pass -> :meth:`readout_answer`. The one prefill readout of answers: the sidecar's
        transformers engine scores answers generated elsewhere with it, and :meth:`score_answers` wraps it.
        The layer is read only in forwards the calling thread runs (``thread_only`` is kept for callers; it is
        always so)."""
        from .hooks import StepStateRecorder, position_ids
        from .nexttoken import summarize_logits
        from .prompting import pad_left

        self.require_position(ANSWER_END)
        if not answer_ids:
            raise ValueError("no answers to read")
        device = next(model.parameters()).device
        enc = pad_left([list(p) + list(a) for p, a in zip(prompt_ids, answer_ids)], pad_id).to(device)
        keep = 1 + max(len(a) for a in answer_ids)
        # every position of the layer is kept (k values each): the answer's own positions are its last len(a)
        # columns (left padding), read as the artifact reads them (last token, or their mean)
        with StepStateRecorder(model, [self.layer], neuron_indices=self.neuron_indices, dtype=torch.float32,
                               all_positions=True) as recorder:
            logits = model(**enc, position_ids=position_ids(enc["attention_mask"]), logits_to_keep=keep).logits
        states = recorder.states()[self.layer]
        values = torch.stack([pool_answer(states[i, states.shape[1] - len(a):] if a else states[i, -1:],
                                          self.answer_read) for i, a in enumerate(answer_ids)])
        logprobs = []
        for i, a in enumerate(answer_ids):
            # left padding: every row's answer is its last len(a) tokens; column -1 - len(a) + j predicts token j
            lp = torch.log_softmax(logits[i, keep - 1 - len(a) : keep - 1].float(), dim=-1)
            logprobs.append([float(lp[j, t]) for j, t in enumerate(a)])
        first = summarize_logits(torch.stack([logits[i, keep - 1 - len(a)] for i, a in enumerate(answer_ids)]),
                                 letter_ids)
        return self.readout_answer(values, logprobs, first, list(kinds))

    def score_answers(self, model, tokenizer, prompts: Sequence[Prompt], answers: Sequence[str], *,
                      batch_size: int = 8, check_fingerprint: bool = True) -> list[ProbeResult]:
        """Confidence in answers given to ``prompts`` (an ``answer_end`` artifact; the answers generated anywhere):
        each prompt rendered with the artifact's format, the answer's text tokenized as the model would have
        generated it, then :meth:`read_answers`. One result per answer, in order."""
        from .prompting import pad_token_id

        self.require_position(ANSWER_END)
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts and {len(answers)} answers")
        self.check_compatible(model, tokenizer, strict=check_fingerprint)
        adds = self.prompt_format.adds_special_tokens(tokenizer)
        letters = self.letter_ids(tokenizer)
        results: list[ProbeResult] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            ids = [tokenizer(self.prompt_format.render(tokenizer, p), add_special_tokens=adds)["input_ids"]
                   for p in chunk]
            answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"]
                          for a in answers[start : start + batch_size]]
            results.extend(self.read_answers(model, ids, answer_ids, [prompt_kind(p) for p in chunk],
                                             letter_ids=letters, pad_id=pad_token_id(tokenizer)))
        return results

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
        hooked layer (value-only artifacts) or at the LM head's last position (stacked artifacts, which add the
        next-token distribution of this same prefill).
        """
        self.require_position(TOKEN_POSITION)
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict) and "role" in prompts[0]
        ):
            prompts = [prompts]
        self.check_compatible(model, tokenizer, strict=check_fingerprint)
        device = next(model.parameters()).device
        letters = self.letter_ids(tokenizer) if self.needs_next_token else None
        results: list[ProbeResult] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            values = self.prefill(model, self.encode(tokenizer, chunk).to(device), letters)
            if values is None:
                raise RuntimeError("the probe hook did not fire during the prefill")
            results.extend(self.readout(values[self.layer], values.get("next_token"), [prompt_kind(p) for p in chunk]))
        return results
