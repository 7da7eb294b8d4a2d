"""Helpers for transformers KV caches: their length, their per-layer tensors, and a fresh cache built from them.

The hooks need the length (a forward whose cache is longer than the prompt prefix is a decode step); offline
extraction and the step search reuse a prompt prefix's cache by copying its per-layer tensors into a new cache,
because a forward appends to the cache it is given, in place.
"""

from __future__ import annotations

import torch

__all__ = ["cache_length", "cache_layers", "cache_from_layers"]


def cache_length(past) -> int:
    """Tokens held by a KV cache (``Cache`` object or the legacy tuple of tuples); 0 for none."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:  # legacy tuple-of-tuples cache
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(keys, values)`` per layer of a transformers KV cache (the ``layers`` of >= 4.56, else the legacy form)."""
    if getattr(cache, "layers", None) and hasattr(cache.layers[0], "keys"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache.to_legacy_cache()]


def cache_from_layers(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A fresh ``DynamicCache`` holding ``kv`` (a forward appends to it in place: never reuse one)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache
