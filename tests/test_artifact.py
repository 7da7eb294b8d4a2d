"""Artifact round trip, validation of damaged files, and fingerprint refusal."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import build_model
from safetensors.torch import save_file

from valueprobe.plugin import (
    ArtifactError,
    FingerprintMismatchError,
    ValueProbe,
    load_artifact,
    read_metadata,
    save_artifact,
)
from valueprobe.plugin.artifact import ArtifactData


@pytest.fixture()
def artifact_path(fitted, tmp_path):
    data, *_ = fitted
    path = tmp_path / "probe.safetensors"
    save_artifact(ArtifactData(dict(data.tensors), dict(data.metadata)), path)
    return path


def test_round_trip_identical_predictions(fitted, artifact_path):
    data, card, prompts, fs = fitted
    in_memory = ValueProbe(ArtifactData(dict(data.tensors), dict(data.metadata)))
    loaded = ValueProbe.load(artifact_path)
    values = fs.features[:, loaded.layer - 1, :][:, loaded.neuron_indices]
    assert np.array_equal(in_memory.predict_proba(values), loaded.predict_proba(values))
    assert np.array_equal(in_memory.raw_scores(values), loaded.raw_scores(values))
    assert loaded.eval_card["selection"]["k"] == loaded.k
    assert set(loaded.thresholds) >= {"escalation", "risk_controlled"}
    md = read_metadata(artifact_path)
    for key in ("format_version", "model_name", "model_fingerprint", "tokenizer_fingerprint", "chat_template_sha256",
                "layer", "hook_point", "token_position", "prompt_format", "objective", "eval_card", "content_sha256"):
        assert key in md, key
    assert md["token_position"] == "last_prompt_token"
    assert "layer_weights_sha256" in json.loads(md["model_fingerprint"])


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("calibrator", ["platt", "isotonic", "temperature", "identity"])
def test_each_head_and_calibrator_round_trips(fitted, tmp_path, head, calibrator):
    from valueprobe.calibration.calibrators import make_calibrator

    data, card, prompts, fs = fitted
    tensors = {k: v for k, v in data.tensors.items() if not k.startswith("calibrator.")}
    probe_for_raw = ValueProbe(ArtifactData({**data.tensors}, {**data.metadata, "head": head}))
    values = fs.features[:, probe_for_raw.layer - 1, :][:, probe_for_raw.neuron_indices]
    raw = probe_for_raw.raw_scores(values)
    cal = make_calibrator(calibrator).fit(raw, fs.labels)
    tensors.update({f"calibrator.{k}": torch.tensor(v, dtype=torch.float64) for k, v in cal.to_params().items()})
    path = tmp_path / f"{head}-{calibrator}.safetensors"
    save_artifact(ArtifactData(tensors, {**data.metadata, "head": head, "calibrator": calibrator}), path)
    loaded = ValueProbe.load(path)
    assert np.array_equal(loaded.predict_proba(values), cal.predict_proba(raw))


def test_truncated_file_is_refused(artifact_path):
    blob = artifact_path.read_bytes()
    artifact_path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ArtifactError, match="truncated|not a readable"):
        ValueProbe.load(artifact_path)


def test_flipped_tensor_byte_is_refused(artifact_path):
    blob = bytearray(artifact_path.read_bytes())
    blob[-3] ^= 0xFF  # inside the last tensor's data
    artifact_path.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="content hash mismatch|non-finite"):
        ValueProbe.load(artifact_path)


def test_edited_metadata_is_refused(artifact_path):
    data = load_artifact(artifact_path)
    md = dict(data.metadata)
    md["layer"] = "1"  # keep the old content hash: an edit without re-signing
    save_file({k: v.contiguous() for k, v in data.tensors.items()}, str(artifact_path), metadata=md)
    with pytest.raises(ArtifactError, match="content hash mismatch"):
        ValueProbe.load(artifact_path)


def test_foreign_and_garbage_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ArtifactError, match="lacks metadata"):
        ValueProbe.load(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ArtifactError):
        ValueProbe.load(garbage)
    with pytest.raises(ArtifactError, match="no artifact"):
        ValueProbe.load(tmp_path / "missing.safetensors")


def test_inconsistent_artifact_cannot_be_saved(fitted, tmp_path):
    data, *_ = fitted
    tensors = dict(data.tensors)
    tensors["neurons.indices"] = torch.tensor([0, 0], dtype=torch.int64)
    with pytest.raises(ArtifactError, match="unique|shape"):
        save_artifact(ArtifactData(tensors, dict(data.metadata)), tmp_path / "bad.safetensors")
    tensors = dict(data.tensors)
    tensors["features.scale"] = -tensors["features.scale"].abs()
    with pytest.raises(ArtifactError, match="positive"):
        save_artifact(ArtifactData(tensors, dict(data.metadata)), tmp_path / "bad.safetensors")
    with pytest.raises(ArtifactError, match="format_version"):
        save_artifact(ArtifactData(dict(data.tensors), {**data.metadata, "format_version": "99"}), tmp_path / "b.safetensors")


def test_same_checkpoint_attaches(fitted, qwen_model, tokenizer, artifact_path):
    probe = ValueProbe.load(artifact_path)
    assert probe.check_compatible(qwen_model, tokenizer) == []
    # bf16 round trip of the same weights keeps the fingerprint (hash is over bf16-rounded weights)
    assert probe.check_compatible(build_model("qwen2", len(tokenizer)).to(torch.bfloat16), tokenizer) == []


def test_float16_load_of_the_same_checkpoint_is_accepted(artifact_path, tokenizer, tmp_path):
    """A float16 model rounds differently from the bf16 hash (it fails that one) and is checked against the
    float16 hash the artifact records; other weights in float16 are still refused; an artifact without the
    float16 hash says so."""
    from valueprobe.plugin.fingerprint import layer_weights_sha256
    from valueprobe.plugin.hooks import find_decoder_layers

    probe = ValueProbe.load(artifact_path)
    half = build_model("qwen2", len(tokenizer)).to(torch.float16)
    block = find_decoder_layers(half).block(probe.layer)
    assert layer_weights_sha256(block) != probe.model_fingerprint["layer_weights_sha256"]  # why fp16 needs its own
    assert probe.check_compatible(half, tokenizer) == []
    with pytest.raises(FingerprintMismatchError) as info:
        probe.check_compatible(build_model("qwen2", len(tokenizer), seed=123).to(torch.float16), tokenizer)
    assert info.value.fields == ["layer_weights_fp16_sha256"]
    data = load_artifact(artifact_path)
    fp = {k: v for k, v in data.json("model_fingerprint").items() if k != "layer_weights_fp16_sha256"}
    old = tmp_path / "old.safetensors"
    save_artifact(ArtifactData(data.tensors, {**data.metadata, "model_fingerprint": json.dumps(fp)}), old)
    with pytest.raises(FingerprintMismatchError, match="no float16 weight hash") as info:
        ValueProbe.load(str(old)).check_compatible(half, tokenizer)
    assert info.value.fields == ["layer_weights_fp16_sha256"]
    assert ValueProbe.load(str(old)).check_compatible(build_model("qwen2", len(tokenizer)), tokenizer) == []


def test_different_checkpoint_same_config_is_refused(artifact_path, tokenizer):
    other = build_model("qwen2", len(tokenizer), seed=123)  # same config, other weights
    probe = ValueProbe.load(artifact_path)
    with pytest.raises(FingerprintMismatchError, match="fingerprint") as info:
        probe.attach(other, tokenizer)
    assert info.value.fields == ["layer_weights_sha256"]
    assert "layer_weights_sha256" in str(info.value)


def test_different_config_names_each_field(artifact_path, tokenizer):
    other = build_model("qwen2", len(tokenizer), intermediate_size=48, rope_theta=5000.0)
    probe = ValueProbe.load(artifact_path)
    with pytest.raises(FingerprintMismatchError) as info:
        probe.attach(other, tokenizer)
    assert {"config.intermediate_size", "config.rope_theta", "layer_weights_sha256"} <= set(info.value.fields)


def test_different_tokenizer_is_refused_and_opt_out_warns(artifact_path, qwen_model):
    from conftest import build_tokenizer

    plain = build_tokenizer(chat=False)
    probe = ValueProbe.load(artifact_path)
    with pytest.raises(FingerprintMismatchError, match="tokenizer.chat_template_sha256"):
        probe.attach(qwen_model, plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = probe.attach(qwen_model, plain, check_fingerprint=False)
    (message,) = [str(w.message) for w in caught if "fingerprint" in str(w.message)]
    # the opt-out's warning says what was done, not the refusal's advice to opt out
    assert "Attached anyway" in message and "pass check_fingerprint=False" not in message
    handle.remove()
    # the mismatch is remembered: no re-hash of the layer, no repeated warning on every call
    import valueprobe.plugin.probe as probe_module

    calls = []
    real = probe_module.model_fingerprint
    probe_module.model_fingerprint = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                # no chat template: the template hash and, rendered without it, the prompts' ids differ
                assert probe.check_compatible(qwen_model, plain, strict=False) == [
                    "tokenizer.chat_template_sha256", "tokenizer.prompt_added_tokens_sha256",
                    "tokenizer.prompt_ids_sha256"]
        with pytest.raises(FingerprintMismatchError, match="pass check_fingerprint=False"):
            probe.check_compatible(qwen_model, plain)
    finally:
        probe_module.model_fingerprint = real
    assert calls == [] and not caught
