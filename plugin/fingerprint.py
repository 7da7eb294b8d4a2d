"""Fingerprints that tie an artifact to the checkpoint and tokenizer it was fitted on.

A probe's neurons mean nothing on another checkpoint, even one with the same config (a fine-tune keeps the
shapes and moves every weight), so the model fingerprint holds the architecture-defining config fields *and* a
hash of the hooked layer's weights.

The weight hash is computed after rounding to bfloat16, so the same checkpoint loaded in fp32 or bf16 (or on CPU
vs GPU) matches. A float16 load rounds differently (and flushes tiny weights), so artifacts also record the hash
of the weights rounded to float16, which a float16 load of the same checkpoint reproduces exactly as long as the
artifact was fitted in float32 (the default) or from a bfloat16 checkpoint; a float16 model is checked against
that one. A differently quantised copy is a different checkpoint here.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .hooks import find_decoder_layers

__all__ = ["CONFIG_FIELDS", "FINGERPRINT_PROMPTS", "TOKENIZER_SCHEME", "WEIGHT_HASH_FIELDS", "config_fingerprint",
           "params_sha256", "model_fingerprint", "tokenizer_fingerprint", "legacy_tokenizer_fingerprint",
           "tokenizer_fingerprint_like", "prompt_token_ids", "chat_template_sha256", "diff_fingerprints",
           "describe_mismatch", "library_versions"]

# The layer-weight hash per rounding: a model is checked with the one its own dtype reproduces.
WEIGHT_HASH_FIELDS = {torch.bfloat16: "layer_weights_sha256", torch.float16: "layer_weights_fp16_sha256"}

# Fields that define the architecture; HF spells some differently per family (GPT-2's n_embd etc.).
CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "n_embd",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "intermediate_size",
    "n_inner",
    "vocab_size",
    "max_position_embeddings",
    "n_positions",
    "rope_theta",
    "hidden_act",
    "activation_function",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "tie_word_embeddings",
)


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def layer_weights_sha256(module: torch.nn.Module, rounding: torch.dtype = torch.bfloat16) -> str:
    """sha256 over the layer's parameters (names, shapes, values rounded to ``rounding``)."""
    return params_sha256(module.named_parameters(), rounding)


def params_sha256(named_params, rounding: torch.dtype = torch.bfloat16) -> str:
    """sha256 over ``(name, tensor)`` pairs in name order: names, shapes, values rounded to ``rounding``
    (bfloat16 or float16). Engines that fuse parameters (vLLM's ``qkv_proj``, ``gate_up_proj``) split them back
    to the Hugging Face names first, so one checkpoint gives one hash whichever engine loaded it."""
    if rounding not in WEIGHT_HASH_FIELDS:
        raise ValueError(f"weights are hashed rounded to one of {list(WEIGHT_HASH_FIELDS)}, not {rounding}")
    digest = hashlib.sha256()
    for name, param in sorted(named_params, key=lambda kv: kv[0]):
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        values = param.detach().to("cpu", rounding).contiguous().view(torch.int16)
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def config_fingerprint(config) -> dict[str, str]:
    """``config.<field>`` entries of a Hugging Face config. ``rope_theta`` is read where either transformers
    major keeps it (top level in 4.x, ``rope_parameters`` in 5.x), so one checkpoint has one fingerprint."""
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    rope = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    return {f"config.{k}": json.dumps(config[k], sort_keys=True) for k in CONFIG_FIELDS if k in config}


def model_fingerprint(model: torch.nn.Module, layer: int, *, for_artifact: bool = False) -> dict[str, str]:
    """Flat ``{field: value}`` fingerprint of ``model`` as seen by a probe on ``layer`` (1-based).

    The weight hash is the one the model's own dtype reproduces (float16 models: the float16-rounded one; others:
    the bfloat16-rounded one); ``for_artifact`` records both, so the artifact can be checked against either."""
    fields = config_fingerprint(model.config)
    block = find_decoder_layers(model).block(layer)
    dtype = next(block.parameters()).dtype
    roundings = list(WEIGHT_HASH_FIELDS) if for_artifact else [torch.float16 if dtype == torch.float16
                                                               else torch.bfloat16]
    for rounding in roundings:
        fields[WEIGHT_HASH_FIELDS[rounding]] = layer_weights_sha256(block, rounding)
    return fields


def chat_template_sha256(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "none"
    if isinstance(template, dict):  # multi-template tokenizers
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()


#: The tokenizer fingerprint's scheme, recorded as ``scheme`` in it. Scheme 1 (no ``scheme`` field) hashed
#: tokenizer attributes (``bos_token``, ``eos_token``, ``unk_token``) whose values transformers 4.57 and 5.x
#: read differently from one and the same GGUF file; scheme 2 hashes only what decides the token ids.
TOKENIZER_SCHEME = "2"

# Rendered with the artifact's own prompt format and tokenized: the ids the probe would read. Digits, code,
# accents, emoji and whitespace runs are where tokenizer releases have disagreed.
FINGERPRINT_PROMPTS = (
    "What is the capital of Peru?",
    "Who wrote the Iliad? Answer in 3 words: 1234567 + 89 = ?",
    {"question": "Which planet is largest?", "choices": ["Mars", "Jupiter", "Venus", "Earth"]},
    [{"role": "user", "content": "def f(x):\n    return x ** 2  # café, naïve, 東京, 👋\t\t  end"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}],
)


def _serialisation(tokenizer) -> dict | None:
    """The tokenizer's own serialisation (``tokenizer.json``), where it has one (fast tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.loads(backend.to_str())


def _added_tokens(tokenizer, serialised: dict | None) -> list[list]:
    """``[id, content, special]`` of every added token, by id."""
    if serialised is not None:
        return sorted([t["id"], t["content"], bool(t.get("special"))] for t in serialised.get("added_tokens", []))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted([int(i), str(t), bool(getattr(t, "special", False))] for i, t in decoder.items())


def _merges(model: dict) -> list[list[str]]:
    """BPE merges as pairs: tokenizers < 0.20 write ``"a b"``, later ones ``["a", "b"]``."""
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []]


def prompt_token_ids(tokenizer, prompt_format) -> list[list[int]]:
    """Token ids of :data:`FINGERPRINT_PROMPTS` rendered with ``prompt_format`` (chat prompts only where the
    tokenizer has a chat template)."""
    rows = []
    for prompt in FINGERPRINT_PROMPTS:
        if isinstance(prompt, list) and not prompt_format.chat_active(tokenizer):
            continue
        text = prompt_format.render(tokenizer, prompt)
        rows.append(list(tokenizer(text, add_special_tokens=prompt_format.adds_special_tokens(tokenizer))["input_ids"]))
    return rows


def tokenizer_fingerprint(tokenizer, prompt_format=None) -> dict[str, str]:
    """Flat fingerprint of what decides the token ids a probe sees (scheme :data:`TOKENIZER_SCHEME`).

    Hashes the vocabulary (every token's id, added tokens included) and the BPE merges as the tokenizer serialises
    them, the chat template, the ids of :data:`FINGERPRINT_PROMPTS` rendered with ``prompt_format`` (the
    artifact's; default :class:`~valueprobe.plugin.prompting.PromptFormat`), and the added tokens those prompts
    use (id, content, special flag). Attribute values a library release may rename or reinterpret
    (``eos_token`` and friends) are left out: the same checkpoint converted by transformers 4.57 and by 5.x
    fingerprints equal.

    Footgun, measured on the Qwen2.5 GGUF: transformers 5.x registers 19 more of its control tokens
    (``<|fim_prefix|>``, ``<tool_call>``, ...) as added tokens than 4.57 does, so a prompt that contains one of
    those strings literally tokenizes differently between the two conversions. Only the added tokens the
    rendered prompts use are hashed, or the two could never match.
    """
    from .prompting import PromptFormat

    serialised = _serialisation(tokenizer)
    prompt_ids = prompt_token_ids(tokenizer, prompt_format or PromptFormat())
    used = {i for row in prompt_ids for i in row}
    return {
        "scheme": TOKENIZER_SCHEME,
        "vocab_size": str(len(tokenizer.get_vocab())),
        "vocab_sha256": _sha256_json(sorted(tokenizer.get_vocab().items())),
        "merges_sha256": _sha256_json(_merges((serialised or {}).get("model") or {})),
        "prompt_added_tokens_sha256": _sha256_json([t for t in _added_tokens(tokenizer, serialised) if t[0] in used]),
        "chat_template_sha256": chat_template_sha256(tokenizer),
        "prompt_ids_sha256": _sha256_json(prompt_ids),
    }


def legacy_tokenizer_fingerprint(tokenizer) -> dict[str, str]:
    """Scheme 1, as artifacts stamped before scheme 2 record it: vocabulary, special-token attributes, chat
    template. Kept to check those artifacts, which still load (see :func:`compare_tokenizer`)."""
    vocab = tokenizer.get_vocab()
    specials = {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "unk": getattr(tokenizer, "unk_token", None),
        "additional": sorted(map(str, getattr(tokenizer, "additional_special_tokens", []) or [])),
    }
    return {
        "vocab_size": str(len(vocab)),
        "vocab_sha256": _sha256_json(sorted(vocab.items())),
        "special_tokens_sha256": _sha256_json(specials),
        "chat_template_sha256": chat_template_sha256(tokenizer),
    }


def tokenizer_fingerprint_like(recorded: dict[str, str], tokenizer, prompt_format=None) -> dict[str, str]:
    """The tokenizer's fingerprint in the scheme ``recorded`` was stamped with (scheme 1 has no ``scheme``)."""
    if recorded.get("scheme") is None:
        return legacy_tokenizer_fingerprint(tokenizer)
    return tokenizer_fingerprint(tokenizer, prompt_format)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide hidden states and token ids, recorded in artifacts at fit time so a
    refusal can say which releases produced each side."""
    import importlib.metadata as md

    out = {}
    for package in ("valueprobe", "transformers", "tokenizers", "torch"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    return out


def _short(value: str | None, width: int = 16) -> str:
    if value is None:
        return "(absent)"
    return value if len(value) <= width else value[:width] + "…"


def describe_mismatch(fields: list[str], expected: dict[str, str], actual: dict[str, str]) -> str:
    """``field: expected X, found Y`` for each mismatched field (values shortened), one clause per field."""
    return "; ".join(f"{f}: expected {_short(expected.get(f))}, found {_short(actual.get(f))}" for f in fields)


def diff_fingerprints(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Names of the fields whose values differ (or exist on one side only), sorted. A weight hash the served
    model did not compute (another rounding) is not compared."""
    skip = {f for f in WEIGHT_HASH_FIELDS.values() if f not in actual}
    return sorted(k for k in (set(expected) | set(actual)) - skip if expected.get(k) != actual.get(k))


def stamp_metadata(model, tokenizer, layer: int, prompt_format) -> dict[str, str]:
    """The artifact metadata that ties a probe to its model, tokenizer and libraries: ``model_fingerprint``,
    ``tokenizer_fingerprint`` (scheme :data:`TOKENIZER_SCHEME`, with ``prompt_format``'s rendering),
    ``chat_template_sha256``, ``library_versions`` and ``producer``. One stamp for every artifact producer
    (prompt confidence, step value, ``valueprobe restamp``)."""
    versions = library_versions()
    return {
        "producer": f"valueprobe {versions.get('valueprobe', 'unknown')}",
        "model_fingerprint": json.dumps(model_fingerprint(model, layer, for_artifact=True), sort_keys=True),
        "tokenizer_fingerprint": json.dumps(tokenizer_fingerprint(tokenizer, prompt_format), sort_keys=True),
        "chat_template_sha256": chat_template_sha256(tokenizer),
        "library_versions": json.dumps(versions, sort_keys=True),
    }
