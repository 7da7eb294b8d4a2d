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
``calibrator.*``         f64           parameters of the calibrator named in the metadata

Metadata (all strings; JSON where structured)
---------------------------------------------
``format_version``, ``producer``, ``model_name``, ``hidden_size``, ``layer``, ``hook_point``, ``token_position``,
``model_fingerprint`` (JSON), ``tokenizer_fingerprint`` (JSON), ``chat_template_sha256``, ``prompt_format``
(JSON), ``objective``, ``head`` (which head scores), ``calibrator``, ``thresholds`` (JSON), ``eval_card`` (JSON)
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

from .readout import CALIBRATOR_PARAMS, CALIBRATORS, HEAD_PARAMS, HEADS

__all__ = [
    "FORMAT_VERSION",
    "HOOK_POINT",
    "TOKEN_POSITION",
    "ArtifactError",
    "ArtifactMismatchError",
    "FingerprintMismatchError",
    "ArtifactData",
    "save_artifact",
    "load_artifact",
    "read_metadata",
]

FORMAT_VERSION = "1"
HOOK_POINT = "decoder_block_output"
TOKEN_POSITION = "last_prompt_token"
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
JSON_METADATA = ("model_fingerprint", "tokenizer_fingerprint", "prompt_format", "thresholds", "eval_card")


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
        md["format_version"] == FORMAT_VERSION,
        f"artifact{where} has format_version {md['format_version']!r}; this valueprobe reads {FORMAT_VERSION!r}",
    )
    for key in JSON_METADATA:
        if key in md:
            try:
                json.loads(md[key])
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"metadata field {key!r}{where} is not valid JSON: {exc}") from None
    for key in ("hidden_size", "layer"):
        _check(md[key].isdigit() and int(md[key]) > 0, f"metadata {key!r}{where} must be a positive integer")
    _check(md["hook_point"] == HOOK_POINT, f"unsupported hook_point {md['hook_point']!r}{where}")
    _check(md["token_position"] == TOKEN_POSITION, f"unsupported token_position {md['token_position']!r}{where}")
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
    if check_hash:
        got = _content_sha256(ts, md)
        _check(
            got == md["content_sha256"],
            f"artifact{where} content hash mismatch (recorded {md['content_sha256'][:12]}…, computed {got[:12]}…): "
            "the file was modified after it was written",
        )


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


def head_tensors(data: ArtifactData, kind: str) -> dict[str, torch.Tensor]:
    return {p: data.tensors[f"head.{kind}.{p}"].to(torch.float32) for p in HEAD_PARAMS[kind]}
