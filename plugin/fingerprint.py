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

__all__ = ["CONFIG_FIELDS", "WEIGHT_HASH_FIELDS", "config_fingerprint", "params_sha256", "model_fingerprint",
           "tokenizer_fingerprint", "chat_template_sha256", "diff_fingerprints"]

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


def tokenizer_fingerprint(tokenizer) -> dict[str, str]:
    """Flat fingerprint of a tokenizer: vocabulary, special tokens and chat template."""
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


def diff_fingerprints(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Names of the fields whose values differ (or exist on one side only), sorted. A weight hash the served
    model did not compute (another rounding) is not compared."""
    skip = {f for f in WEIGHT_HASH_FIELDS.values() if f not in actual}
    return sorted(k for k in (set(expected) | set(actual)) - skip if expected.get(k) != actual.get(k))
