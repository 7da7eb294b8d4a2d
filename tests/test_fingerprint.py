"""Fingerprints that mean "the probe sees the same token ids", a converted copy any engine loads, answers that stop
at the end of a turn, and re-stamping artifacts stamped the old way.

The GGUF here is tiny and written in-process (``tests/tiny_gguf.py``) with the tokenizer metadata the Qwen2.5 GGUF
files carry; ``tests/data/tiny-qwen2.tokenizer-transformers-4.57.1`` is the tokenizer transformers 4.57.1 converted
from that file and saved (``AutoTokenizer.from_pretrained(dir, gguf_file=...).save_pretrained(...)``), so the
test sees what each transformers major makes of one checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import build_model
from tiny_gguf import write_tiny_qwen2_gguf
from transformers import AutoTokenizer

from valueprobe.plugin import FingerprintMismatchError, ValueProbe, save_artifact
from valueprobe.plugin.artifact import ArtifactData
from valueprobe.plugin.fingerprint import legacy_tokenizer_fingerprint, tokenizer_fingerprint
from valueprobe.plugin.models import (
    CONVERSION_VERSION,
    KNOWN_MODELS,
    KnownModel,
    convert_gguf,
    end_of_turn_token_ids,
    eos_token_ids,
    load_model,
    resolve_model_dir,
)

DATA = Path(__file__).parent / "data"
SAVED_BY_457 = DATA / "tiny-qwen2.tokenizer-transformers-4.57.1"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The tiny GGUF converted by the transformers installed here."""
    return convert_gguf(DATA / "tiny-qwen2.gguf", tmp_path_factory.mktemp("conv") / "tiny", name="tiny-qwen2")


def test_the_committed_gguf_is_the_one_the_builder_writes(tmp_path):
    """The fixture's 4.57 serialisation belongs to this exact GGUF: rebuild it and compare bytes."""
    write_tiny_qwen2_gguf(str(tmp_path / "x.gguf"))
    assert (tmp_path / "x.gguf").read_bytes() == (DATA / "tiny-qwen2.gguf").read_bytes()


def test_one_checkpoint_converted_by_transformers_4_and_5_fingerprints_equal(converted):
    old = AutoTokenizer.from_pretrained(SAVED_BY_457)
    new = AutoTokenizer.from_pretrained(converted)
    # what scheme 1 hashed really differs between the two conversions ...
    assert (old.eos_token, old.bos_token) == ("<|endoftext|>", None)
    assert new.eos_token == "<|im_end|>"
    assert legacy_tokenizer_fingerprint(old)["special_tokens_sha256"] != \
        legacy_tokenizer_fingerprint(new)["special_tokens_sha256"]
    # ... while the ids of rendered prompts are the same, and so is the scheme-2 fingerprint
    assert tokenizer_fingerprint(old) == tokenizer_fingerprint(new)
    assert tokenizer_fingerprint(old)["scheme"] == "2"
    # the documented footgun: 5.x registers unused control tokens as added tokens, 4.57 does not
    assert old("x <|fim_prefix|>")["input_ids"] != new("x <|fim_prefix|>")["input_ids"]


@pytest.mark.parametrize("change", ["vocab", "template", "added"])
def test_what_decides_the_ids_changes_the_fingerprint(converted, tmp_path, change):
    folder = tmp_path / "tok"
    shutil.copytree(converted, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    base = tokenizer_fingerprint(AutoTokenizer.from_pretrained(folder))
    if change == "template":
        (folder / "chat_template.jinja").write_text((folder / "chat_template.jinja").read_text().replace("\n", "\n\n"))
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        tok = AutoTokenizer.from_pretrained(folder)
        if change == "vocab":
            tok.add_tokens(["Peru"])  # a new whole-word token: the rendered prompts' ids change too
        else:
            tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|x|>"]})
    changed = tokenizer_fingerprint(tok)
    assert changed != base
    if change == "template":
        assert changed["chat_template_sha256"] != base["chat_template_sha256"]
    if change == "vocab":
        assert changed["prompt_ids_sha256"] != base["prompt_ids_sha256"]


def test_converted_copy_is_a_plain_checkpoint_that_stops_at_the_end_of_a_turn(converted):
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    stamp = json.loads((converted / "valueprobe-converted.json").read_text())
    assert stamp["conversion"] == CONVERSION_VERSION
    model, tok = load_model(str(converted))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list) \
        else model.generation_config.eos_token_id == im_end
    old = AutoTokenizer.from_pretrained(SAVED_BY_457)  # eos_token says <|endoftext|>
    assert end_of_turn_token_ids(old) == end_of_turn_token_ids(tok) == {im_end}
    bare = build_model("qwen2", len(tok))  # a model whose generation config knows nothing of <|im_end|>
    assert im_end in eos_token_ids(bare, old)


def test_a_cache_written_by_an_older_conversion_is_rewritten(tmp_path, monkeypatch):
    gguf_dir = tmp_path / "pkg"
    gguf_dir.mkdir()
    shutil.copy(DATA / "tiny-qwen2.gguf", gguf_dir / "tiny.gguf")
    monkeypatch.setenv("VALUEPROBE_CACHE", str(tmp_path / "cache"))
    known = KnownModel("tiny-known", "tiny.gguf", (("pkg", "tiny.gguf"),), None, "")
    monkeypatch.setitem(KNOWN_MODELS, "tiny-known", known)
    monkeypatch.setattr(KnownModel, "part_paths", lambda self: [gguf_dir / "tiny.gguf"])
    folder = Path(resolve_model_dir("tiny-known"))
    # what the previous conversion left: a stamp without a version and GGUF's quantization_config
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "dequantize": False}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "valueprobe-converted.json").write_text(json.dumps({"name": "tiny-known", "gguf": "tiny.gguf"}))
    again = Path(resolve_model_dir("tiny-known"))
    assert again == folder
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / "valueprobe-converted.json").read_text())["conversion"] == CONVERSION_VERSION


def _stamped_the_old_way(fitted, tokenizer, **overrides) -> ValueProbe:
    """The tiny artifact as valueprobe stamped it before scheme 2, under a transformers that named another eos
    (saved and loaded back, as a shipped file would be)."""
    import tempfile

    data, *_ = fitted
    legacy = legacy_tokenizer_fingerprint(tokenizer)
    legacy["special_tokens_sha256"] = "0" * 64
    legacy.update(overrides)
    metadata = {k: v for k, v in data.metadata.items() if k != "library_versions"}
    metadata["tokenizer_fingerprint"] = json.dumps(legacy, sort_keys=True)
    with tempfile.TemporaryDirectory() as folder:
        save_artifact(ArtifactData(dict(data.tensors), metadata), Path(folder) / "old.safetensors")
        return ValueProbe.load(Path(folder) / "old.safetensors")


def test_an_old_stamp_is_refused_with_both_values_and_how_to_restamp(fitted, qwen_model, tokenizer):
    probe = _stamped_the_old_way(fitted, tokenizer)
    with pytest.raises(FingerprintMismatchError) as info:
        probe.check_compatible(qwen_model, tokenizer)
    message = str(info.value)
    assert info.value.fields == ["tokenizer.special_tokens_sha256"]
    assert "expected 0000000000000000…, found " in message
    assert "valueprobe restamp" in message and "records no library versions" in message
    assert "transformers " + __import__("transformers").__version__ in message


def test_restamp_keeps_the_numbers_and_records_scheme_2(fitted, qwen_model, tokenizer, tmp_path):
    data, card, prompts, fs = fitted
    old = _stamped_the_old_way(fitted, tokenizer)
    fresh = old.restamped(qwen_model, tokenizer)
    path = tmp_path / "restamped.safetensors"
    fresh.save(path)
    loaded = ValueProbe.load(path)
    assert loaded.fingerprint_scheme == "2" and loaded.check_compatible(qwen_model, tokenizer) == []
    assert loaded.data.metadata["restamped_from"] == old.data.metadata["content_sha256"]
    assert json.loads(loaded.data.metadata["library_versions"])["transformers"]
    values = fs.features[:, loaded.layer - 1, :][:, loaded.neuron_indices]
    assert (loaded.predict_proba(values) == old.predict_proba(values)).all()
    assert loaded.eval_card == old.eval_card and loaded.thresholds == old.thresholds


def test_restamp_refuses_another_vocabulary_or_other_weights(fitted, qwen_model, tokenizer):
    with pytest.raises(FingerprintMismatchError) as info:
        _stamped_the_old_way(fitted, tokenizer, vocab_sha256="1" * 64).restamped(qwen_model, tokenizer)
    assert "tokenizer.vocab_sha256" in info.value.fields
    other = build_model("qwen2", len(tokenizer), seed=1)
    with pytest.raises(FingerprintMismatchError) as info:
        _stamped_the_old_way(fitted, tokenizer).restamped(other, tokenizer)
    assert "layer_weights_sha256" in info.value.fields
