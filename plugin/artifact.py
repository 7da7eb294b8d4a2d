"""The value-probe artifact: one safetensors file, tensors plus str->str metadata, no pickle.

Tensors
-------
``neurons.indices``      int64 ``[k]``   hidden units read at the hooked layer (sorted, unique)
``features.mean``        f32   ``[k]``   standardisation
``features.scale``       f32   ``[k]``
``head.linear.weight``   f32   ``[k]``   linear head on the standardised values
``head.linear.bias``     f32   ``[1]``
``head.mlp.fc1.weight``  f32   ``[h, k]`` optional two-layer MLP head (ReLU)
``head.mlp.fc1.bias``    f32   ``[h]``
``head.mlp.fc2.weight``  f32   ``[h]``
``head.mlp.fc2.bias``    f32   ``[1]``
``calibrator.*``         f64           parameters of the value calibrator named in the metadata
``stack.<kind>.*``       f64           per question kind (``choice``, ``open``): the stacker on
                                       ``[value logit, logit(max-softmax), entropy]`` (``mean``, ``scale``,
                                       ``weight`` ``[3]``, ``bias`` ``[1]``) and its Platt ``calibrator.a/b``
``ood.mean``, ``ood.precision``, ``ood.threshold``  f64  Mahalanobis out-of-distribution distance on the k values

Metadata (all strings; JSON where structured)
---------------------------------------------
``format_version``, ``producer``, ``model_name``, ``hidden_size``, ``layer``, ``hook_point``, ``token_position``,
``model_fingerprint`` (JSON), ``tokenizer_fingerprint`` (JSON; its ``scheme``, see :mod:`~valueprobe.plugin.fingerprint`),
``answer_read`` (answer_end artifacts: ``last``, the state at the answer's last token, the default; or ``mean``, the
states of all its tokens averaged), ``stack_features`` (JSON: the stacker's columns; at the answer's end either
layout of :data:`~valueprobe.plugin.readout.ANSWER_STACK_LAYOUTS`),
``chat_template_sha256``, ``library_versions`` (JSON: valueprobe, transformers, tokenizers, torch at stamping),
``restamped_from`` (the ``content_sha256`` a ``valueprobe restamp`` replaced), ``prompt_format``
(JSON), ``objective``, ``head`` (which head scores), ``calibrator``, ``served_score`` (``value`` or ``stacked``: which
number ``probability`` is), ``stack_kinds`` (JSON), ``thresholds`` (JSON), ``eval_card`` (JSON),
after a recalibration from feedback (``ValueProbe.recalibrated``) ``calibration_version`` (0 when absent: as fitted),
``recalibrated_from`` and ``calibration_origin`` (the replaced and the fitted ``content_sha256``) and
``recalibration`` (JSON: the Platt maps applied, per slot, and the feedback evidence they were promoted on),
and ``content_sha256``: a hash over every tensor and every other metadata field, so a truncated or edited file is
refused instead of silently scoring garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .readout import (ANSWER_READS, ANSWER_STACK_LAYOUTS, CALIBRATOR_PARAMS, CALIBRATORS, HEAD_PARAMS, HEADS, STACK_FEATURES,
                      STACK_PARAMS)

__all__ = [
    "FORMAT_VERSION",
    "HOOK_POINT",
    "TOKEN_POSITION",
    "TOKEN_POSITIONS",
    "ANSWER_END",
    "ArtifactError",
    "ArtifactMismatchError",
    "FingerprintMismatchError",
    "ArtifactData",
    "save_artifact",
    "load_artifact",
    "read_metadata",
]

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # version 1: value neurons only (no stack, no OOD)
SERVED_SCORES = ("value", "stacked")
HOOK_POINT = "decoder_block_output"
TOKEN_POSITION = "last_prompt_token"
# "step_end": a value over reasoning steps (`valueprobe fit-steps`), read at the token ending each step; the
# sidecar uses such an artifact for step search only, never to score prompts.
# "answer_end": confidence in a given answer, read at the answer's last token (the decode step that emits the end
# of the answer computes it), stacked with the answer's token log-probabilities (`valueprobe fit --answer-end`).
ANSWER_END = "answer_end"
TOKEN_POSITIONS = (TOKEN_POSITION, "step_end", ANSWER_END)
REQUIRED_METADATA = (
    "format_version",
    "model_name",
    "hidden_size",
    "layer",
    "hook_point",
    "token_position",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "chat_template_sha256",
    "prompt_format",
    "objective",
    "head",
    "calibrator",
    "content_sha256",
)
JSON_METADATA = ("model_fingerprint", "tokenizer_fingerprint", "library_versions", "prompt_format", "thresholds",
                 "eval_card", "stack_kinds", "stack_features", "recalibration")


class ArtifactError(ValueError):
    """The file is not a valid value-probe artifact (truncated, tampered, foreign or inconsistent)."""


class ArtifactMismatchError(ArtifactError):
    """The artifact is valid but belongs to another model, layer or tokenizer."""


class FingerprintMismatchError(ArtifactMismatchError):
    """The model or tokenizer fingerprint differs from the one recorded at fit time.

    ``fields`` lists the mismatched fingerprint fields.
    """

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


@dataclass
class ArtifactData:
    """Everything an artifact holds, as plain tensors and strings (the in-memory form of the file)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    path: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.tensors["neurons.indices"].numel())

    def json(self, key: str, default=None):
        text = self.metadata.get(key)
        return default if text is None else json.loads(text)


def _content_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for key in sorted(metadata):
        if key != "content_sha256":
            digest.update(key.encode() + b"\0" + metadata[key].encode() + b"\0")
    return digest.hexdigest()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ArtifactError(message)


def validate(data: ArtifactData, *, check_hash: bool = True) -> None:
    """Raise :class:`ArtifactError` naming the first inconsistency; return ``None`` when the artifact is sound."""
    md, ts = data.metadata, data.tensors
    where = f" in {data.path}" if data.path else ""
    missing = [k for k in REQUIRED_METADATA if k not in md]
    _check(not missing, f"artifact{where} lacks metadata fields {missing}: not a valueprobe artifact?")
    _check(
        md["format_version"] in READABLE_VERSIONS,
        f"artifact{where} has format_version {md['format_version']!r}; this valueprobe reads {READABLE_VERSIONS}",
    )
    for key in JSON_METADATA:
        if key in md:
            try:
                json.loads(md[key])
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"metadata field {key!r}{where} is not valid JSON: {exc}") from None
    for key in ("hidden_size", "layer"):
        _check(md[key].isdigit() and int(md[key]) > 0, f"metadata {key!r}{where} must be a positive integer")
    _check(md.get("calibration_version", "0").isdigit(),
           f"metadata 'calibration_version'{where} must be a non-negative integer")
    _check(md["hook_point"] == HOOK_POINT, f"unsupported hook_point {md['hook_point']!r}{where}")
    _check(md["token_position"] in TOKEN_POSITIONS,
           f"unsupported token_position {md['token_position']!r}{where}; expected one of {TOKEN_POSITIONS}")
    _check(md["head"] in HEADS, f"unknown head {md['head']!r}{where}; expected one of {HEADS}")
    _check(md["calibrator"] in CALIBRATORS, f"unknown calibrator {md['calibrator']!r}{where}")

    _check("neurons.indices" in ts, f"artifact{where} lacks tensor 'neurons.indices'")
    idx = ts["neurons.indices"]
    _check(idx.dtype == torch.int64 and idx.dim() == 1 and idx.numel() > 0, "neurons.indices must be int64 [k], k>0")
    k, hidden = idx.numel(), int(md["hidden_size"])
    _check(bool((idx >= 0).all() and (idx < hidden).all()), f"neuron indices outside [0, {hidden})")
    _check(torch.unique(idx).numel() == k, "neuron indices are not unique")

    expected_shapes = {"features.mean": (k,), "features.scale": (k,)}
    expected_shapes.update({"head.linear.weight": (k,), "head.linear.bias": (1,)})
    if any(name.startswith("head.mlp.") for name in ts) or md["head"] == "mlp":
        h = ts.get("head.mlp.fc1.weight", torch.empty(0, k)).shape[0]
        expected_shapes.update(
            {"head.mlp.fc1.weight": (h, k), "head.mlp.fc1.bias": (h,), "head.mlp.fc2.weight": (h,), "head.mlp.fc2.bias": (1,)}
        )
    for name in (f"calibrator.{p}" for p in CALIBRATOR_PARAMS[md["calibrator"]]):
        expected_shapes.setdefault(name, None)
    for name, shape in expected_shapes.items():
        _check(name in ts, f"artifact{where} lacks tensor {name!r}")
        if shape is not None:
            _check(tuple(ts[name].shape) == shape, f"tensor {name!r} has shape {tuple(ts[name].shape)}, expected {shape}")
    for name, t in ts.items():
        if t.is_floating_point():
            _check(bool(torch.isfinite(t).all()), f"tensor {name!r} has non-finite values")
    _check(bool((ts["features.scale"] > 0).all()), "features.scale must be positive")
    if md["calibrator"] == "temperature":
        _check(float(ts["calibrator.temperature"].reshape(-1)[0]) > 0, "temperature must be positive")
    if md["calibrator"] == "isotonic":
        x = ts["calibrator.x_thresholds"]
        _check(x.dim() == 1 and x.numel() >= 1 and x.shape == ts["calibrator.y_thresholds"].shape, "isotonic thresholds malformed")
        _check(bool((x[1:] >= x[:-1]).all()), "isotonic x_thresholds must be sorted")
    for name in (f"calibrator.{p}" for p in CALIBRATOR_PARAMS[md["calibrator"]] if md["calibrator"] != "isotonic"):
        _check(ts[name].numel() == 1, f"tensor {name!r} must hold one value, has shape {tuple(ts[name].shape)}")
    if md["calibrator"] == "platt":
        _check(float(ts["calibrator.a"].reshape(-1)[0]) > 0,
               "tensor 'calibrator.a' (Platt slope) must be positive: a negative slope inverts confidence")
    _validate_prompt_format(md["prompt_format"])
    if "thresholds" in md:
        _validate_thresholds(json.loads(md["thresholds"]))
    _validate_stack(md, ts, where)
    _validate_ood(ts, k)
    if check_hash:
        got = _content_sha256(ts, md)
        _check(
            got == md["content_sha256"],
            f"artifact{where} content hash mismatch (recorded {md['content_sha256'][:12]}…, computed {got[:12]}…): "
            "the file was modified after it was written",
        )


_TEMPLATE_FIELDS = {"open_template": {"question"}, "choices_template": {"question", "choices"},
                    "plain_template": {"user"}}


def _validate_prompt_format(text: str) -> None:
    import string

    fmt = json.loads(text)
    _check(isinstance(fmt, dict), "metadata 'prompt_format' must be a JSON object")
    for key, allowed in _TEMPLATE_FIELDS.items():
        template = fmt.get(key)
        if template is None:
            continue
        _check(isinstance(template, str), f"prompt_format.{key} must be a string")
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            raise ArtifactError(f"prompt_format.{key} is not a valid template: {exc}") from None
        _check(names <= allowed, f"prompt_format.{key} has placeholders {sorted(names - allowed)}; allowed: {sorted(allowed)}")
    letters = fmt.get("letters", "ABCDEFGHIJ")
    _check(isinstance(letters, str) and len(letters) >= 2 and len(set(letters)) == len(letters),
           "prompt_format.letters must be at least two distinct characters")


def _is_probability(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0 + 1e-9


def _validate_thresholds(th) -> None:
    _check(isinstance(th, dict), "metadata 'thresholds' must be a JSON object")
    esc = th.get("escalation", {})
    _check(isinstance(esc, dict) and all(_is_probability(v) for v in esc.values()),
           "thresholds.escalation must map rates to probabilities in [0, 1]")
    risk = th.get("risk_controlled", {})
    _check(isinstance(risk, dict), "thresholds.risk_controlled must be an object")
    for key, entry in risk.items():
        _check(isinstance(entry, dict) and "threshold" in entry,
               f"thresholds.risk_controlled[{key!r}] must be an object with a 'threshold'")
        _check(entry["threshold"] is None or _is_probability(entry["threshold"]),
               f"thresholds.risk_controlled[{key!r}].threshold must be null or a probability")


def _validate_stack(md: dict, ts: dict, where: str) -> None:
    served = md.get("served_score", "value")
    _check(served in SERVED_SCORES, f"metadata 'served_score' is {served!r}; expected one of {SERVED_SCORES}")
    try:
        kinds = json.loads(md.get("stack_kinds", "[]"))
    except json.JSONDecodeError:
        raise ArtifactError("metadata 'stack_kinds' is not valid JSON") from None
    _check(isinstance(kinds, list) and set(kinds) <= {"choice", "open"}, "metadata 'stack_kinds' must list choice/open")
    _check(served == "value" or kinds, "served_score 'stacked' needs at least one kind in 'stack_kinds'")
    # The stacker's columns depend on where the artifact reads: a stack fitted on answer log-probabilities must
    # never be fed next-token signals (or the reverse), so the names are part of the contract.
    answer_end = md.get("token_position") == ANSWER_END
    layouts = [list(x) for x in ANSWER_STACK_LAYOUTS] if answer_end else [list(STACK_FEATURES)]
    expected = layouts[0]
    _check("stack_features" in md or served == "value" or not answer_end,
           f"an artifact with token_position {ANSWER_END!r} and a stack needs metadata 'stack_features'")
    if "stack_features" in md:
        try:
            names = json.loads(md["stack_features"])
        except json.JSONDecodeError:
            raise ArtifactError("metadata 'stack_features' is not valid JSON") from None
        _check(names in layouts, f"metadata 'stack_features' is {names!r}; an artifact with token_position "
                                 f"{md.get('token_position')!r} needs one of {layouts!r}")
        expected = names
    read = md.get("answer_read", "last")
    _check(read in ANSWER_READS, f"metadata 'answer_read' is {read!r}; expected one of {ANSWER_READS}")
    _check(read == "last" or answer_end,
           f"metadata 'answer_read' {read!r} needs token_position {ANSWER_END!r}, not {md.get('token_position')!r}")
    n = len(expected)
    shapes = {"mean": (n,), "scale": (n,), "weight": (n,), "bias": (1,), "calibrator.a": (1,), "calibrator.b": (1,)}
    for kind in kinds:
        for name, shape in shapes.items():
            full = f"stack.{kind}.{name}"
            _check(full in ts, f"artifact{where} lacks tensor {full!r}")
            _check(tuple(ts[full].shape) == shape, f"tensor {full!r} has shape {tuple(ts[full].shape)}, expected {shape}")
        _check(bool((ts[f"stack.{kind}.scale"] > 0).all()), f"tensor 'stack.{kind}.scale' must be positive")
        _check(float(ts[f"stack.{kind}.calibrator.a"][0]) > 0,
               f"tensor 'stack.{kind}.calibrator.a' (Platt slope) must be positive")


def _validate_ood(ts: dict, k: int) -> None:
    present = [n for n in ("ood.mean", "ood.precision", "ood.threshold") if n in ts]
    if not present:
        return
    _check(len(present) == 3, f"OOD tensors incomplete: has {present}, needs ood.mean, ood.precision, ood.threshold")
    _check(tuple(ts["ood.mean"].shape) == (k,), f"tensor 'ood.mean' has shape {tuple(ts['ood.mean'].shape)}, expected ({k},)")
    prec = ts["ood.precision"]
    _check(tuple(prec.shape) == (k, k), f"tensor 'ood.precision' has shape {tuple(prec.shape)}, expected ({k}, {k})")
    _check(bool(torch.allclose(prec, prec.T, rtol=1e-5, atol=1e-8)), "tensor 'ood.precision' must be symmetric")
    _check(ts["ood.threshold"].numel() == 1 and float(ts["ood.threshold"].reshape(-1)[0]) >= 0,
           "tensor 'ood.threshold' must be one non-negative value")


def save_artifact(data: ArtifactData, path: str | os.PathLike) -> str:
    """Validate and write ``data`` to ``path`` (atomically). Returns the content hash.

    Tensors are made contiguous and non-shared first (safetensors refuses shared storage).
    """
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in data.tensors.items()}
    metadata = {k: str(v) for k, v in data.metadata.items() if k != "content_sha256"}
    metadata.setdefault("format_version", FORMAT_VERSION)
    metadata.setdefault("hook_point", HOOK_POINT)
    metadata.setdefault("token_position", TOKEN_POSITION)
    metadata["content_sha256"] = _content_sha256(tensors, metadata)
    validate(ArtifactData(tensors, metadata, str(path)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    data.metadata = metadata
    return metadata["content_sha256"]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Header only (fast): the metadata dict, without validating tensors."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path} as a safetensors artifact: {exc}") from None


def load_artifact(path: str | os.PathLike) -> ArtifactData:
    """Read and fully validate an artifact. Raises :class:`ArtifactError` with a clear reason on any defect."""
    path = str(path)
    if not os.path.isfile(path):
        raise ArtifactError(f"no artifact at {path}")
    try:
        tensors = {}
        with safe_open(path, framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or foreign?): {exc}") from None
    data = ArtifactData(tensors, metadata, path)
    validate(data)
    return data


def calibrator_arrays(data: ArtifactData) -> dict[str, np.ndarray]:
    kind = data.metadata["calibrator"]
    return {p: data.tensors[f"calibrator.{p}"].numpy() for p in CALIBRATOR_PARAMS[kind]}


def stack_arrays(data: ArtifactData) -> dict[str, dict[str, np.ndarray]]:
    """``{kind: {param: array}}`` of the per-kind stackers (empty for a value-only artifact)."""
    kinds = json.loads(data.metadata.get("stack_kinds", "[]"))
    return {kind: {p: data.tensors[f"stack.{kind}.{p}"].to(torch.float64).numpy() for p in STACK_PARAMS}
            for kind in kinds}


def head_tensors(data: ArtifactData, kind: str) -> dict[str, torch.Tensor]:
    return {p: data.tensors[f"head.{kind}.{p}"].to(torch.float32) for p in HEAD_PARAMS[kind]}
