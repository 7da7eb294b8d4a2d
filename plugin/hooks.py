"""Forward hooks that read the residual stream at the last real prompt token.

Layer numbering follows ``output_hidden_states``: layer ``l`` (1-based) is the output of decoder block ``l - 1``,
i.e. ``hidden_states[l]``. (HF models put the *final norm* on ``hidden_states[-1]``; the hook reads the block's
raw output, so for the last layer the two differ by that norm. Layers 1..L-1 match exactly.)

Hooks are global state on the model, so every hook object here has one lifecycle (:class:`Hooks`): it registers
in ``__enter__`` and removes in ``__exit__`` (``remove()`` too, safe twice). Two pieces cooperate:

* a forward *pre*-hook on the module that owns the decoder layers sees the 2-D ``attention_mask`` and the KV
  cache, works out the last real token of each row (left or right padding) and whether this forward is a
  prefill (empty cache) or a decode step (skipped);
* a forward hook on each chosen decoder layer copies just those positions (and, when asked, just the selected
  neurons), detached, to CPU float32.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .kvcache import cache_length

__all__ = [
    "position_ids",
    "LayerNotFoundError",
    "StopForward",
    "DecoderLayers",
    "find_decoder_layers",
    "last_token_positions",
    "LastTokenReader",
    "capture",
    "StepStateRecorder",
    "Hooks",
    "LogitsHandOff",
]


class LayerNotFoundError(LookupError):
    """The model has no recognisable decoder-layer list, or the requested layer is out of range."""


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (offline extraction only); swallowed by :func:`capture`."""


def _num_layers_from_config(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        return _num_layers_from_config(text_config)
    return None


@dataclass(frozen=True)
class DecoderLayers:
    """Where a model keeps its decoder blocks: ``owner`` runs them in order, ``layers[i]`` is block ``i``."""

    path: str
    owner_path: str
    owner: nn.Module
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)

    def block(self, layer: int) -> nn.Module:
        """Module whose output is hidden-state layer ``layer`` (1-based, as in ``output_hidden_states``)."""
        if not 1 <= layer <= len(self.layers):
            raise LayerNotFoundError(f"layer {layer} is out of range 1..{len(self.layers)} for {self.path}")
        return self.layers[layer - 1]


def find_decoder_layers(model: nn.Module) -> DecoderLayers:
    """Find the decoder-block list generically: the ``ModuleList`` whose length is the config's layer count.

    Works for Llama, Qwen2/3, Mistral, Gemma, Phi (``model.layers``), GPT-2 (``transformer.h``), GPT-NeoX
    (``gpt_neox.layers``), OPT (``model.decoder.layers``) and others with no per-family table. When several lists
    qualify the shallowest wins (vision towers and the like sit deeper).

    Raises
    ------
    LayerNotFoundError
        When no such list exists.
    """
    expected = _num_layers_from_config(getattr(model, "config", None))
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if expected is None or len(module) == expected:
                # Decoder blocks are all the same class.
                if len({type(m) for m in module}) == 1:
                    candidates.append((name.count("."), -len(module), name, module))
    if not candidates:
        raise LayerNotFoundError(
            f"no decoder-layer ModuleList of length {expected} found in {type(model).__name__}"
        )
    candidates.sort(key=lambda c: (c[0], c[1]))
    _, _, path, layers = candidates[0]
    owner_path = path.rsplit(".", 1)[0] if "." in path else ""
    owner = model.get_submodule(owner_path) if owner_path else model
    return DecoderLayers(path=path, owner_path=owner_path, owner=owner, layers=layers)


def last_token_positions(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding.

    ``attention_mask`` is ``[batch, seq_len]`` with 1 for real tokens; ``None`` means no padding.
    """
    if attention_mask is None:
        return torch.full((batch,), seq_len - 1, dtype=torch.long)
    mask = attention_mask[:, -seq_len:].to(torch.bool)
    # Last True per row: flip, argmax finds the first True from the right.
    from_right = mask.flip(1).to(torch.int8).argmax(dim=1)
    positions = seq_len - 1 - from_right
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a row of the attention mask has no real token")
    return positions


class Hooks:
    """One lifecycle for every hook object (baukit's ``Trace`` habit): hooks are registered in ``__enter__`` and
    removed in ``__exit__``; ``remove()`` does the same as ``__exit__`` and is safe twice, entering twice registers
    once. Subclasses say what to register in :meth:`_register`."""

    _handles: list

    def _register(self) -> list:
        """Register this object's hooks; return their removable handles."""
        raise NotImplementedError

    def _on_remove(self) -> None:
        """Forget per-forward state when the hooks go (subclasses that keep some)."""

    def __enter__(self):
        if not self._handles:
            self._handles = list(self._register())
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach every hook; safe to call twice."""
        while self._handles:
            self._handles.pop().remove()
        self._on_remove()

    @property
    def registered(self) -> bool:
        return bool(self._handles)


class LogitsHandOff:
    """Values read at a decoder layer that wait for the LM head of the same forward pass, which appends the
    next-token summary of the same rows (:func:`~valueprobe.plugin.nexttoken.summarize_logits`: ``2 + letters``
    floats per row, so the vocabulary never leaves the device). The Hugging Face reader and the vLLM worker both
    read the probe's layer first and the logits after, so both hand off through this."""

    def __init__(self, letter_ids: Sequence[int]):
        self.letter_ids = list(letter_ids)
        self._held = None

    def hold(self, values) -> None:
        """Keep ``values`` (whatever the caller needs back) until :meth:`complete` of this forward."""
        self._held = values

    def complete(self, rows_of: Callable[[object], torch.Tensor]):
        """``(held values, [rows, 2 + letters] summary)``, or ``None`` when nothing is held (a decode step, another
        thread's forward). ``rows_of(held)`` gives the ``[rows, vocab]`` logits of the held rows."""
        held, self._held = self._held, None
        if held is None:
            return None
        from .nexttoken import summarize_logits

        return held, summarize_logits(rows_of(held), self.letter_ids)

    def clear(self) -> None:
        self._held = None


@dataclass
class LastTokenReader(Hooks):
    """Hooks that read chosen layers at the last real token of each prefill, while entered (:class:`Hooks`).

    Parameters
    ----------
    model:
        The HF causal LM (or its base model).
    layers:
        1-based layer numbers to read.
    neuron_indices:
        If given, only these hidden units are copied (``[k]`` long tensor); otherwise the full hidden vector.
    on_prefill:
        Called once per prefill with ``{layer: tensor[batch, k or hidden]}`` (CPU float32, detached).
    stop_after:
        Raise :class:`StopForward` after the deepest requested layer (offline extraction; never when serving).
    thread_only:
        Act only on forward passes run by the thread that registered the hooks, so that two threads can run
        forwards of one model at once (a server scoring prompts while another thread generates), each reading
        only its own.
    next_token_ids:
        If given (option-letter token ids), also read the LM head's logits at the last prompt token of each
        prefill and add ``values["next_token"]``: the ``[batch, 2 + letters]`` summary of
        :func:`valueprobe.plugin.nexttoken.summarize_logits` (the vocabulary never leaves the device).
    prefill_cache_length:
        Cache length a prefill starts from: 0 normally; the shared prefix's length when the caller passes a
        KV cache of a prompt prefix that every row shares (offline extraction reuses the chat template's
        system part this way). Forwards that start later are decode steps and are skipped.
    """

    model: nn.Module
    layers: Sequence[int]
    on_prefill: Callable[[dict[int, torch.Tensor]], None]
    neuron_indices: torch.Tensor | None = None
    stop_after: bool = False
    prefill_cache_length: int = 0
    next_token_ids: Sequence[int] | None = None
    thread_only: bool = False
    _handles: list = field(default_factory=list, init=False, repr=False)
    _positions: torch.Tensor | None = field(default=None, init=False, repr=False)
    _active: bool = field(default=False, init=False, repr=False)
    _values: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.decoder = find_decoder_layers(self.model)
        self.layers = sorted(set(int(x) for x in self.layers))
        for layer in self.layers:
            self.decoder.block(layer)  # validate up front: a bad layer fails before any forward pass
        if self.neuron_indices is not None:
            self.neuron_indices = torch.as_tensor(self.neuron_indices, dtype=torch.long)
        self._device_indices: dict = {}
        self._head = None
        self._hand_off = None
        if self.next_token_ids is not None:
            get = getattr(self.model, "get_output_embeddings", None)
            self._head = get() if callable(get) else None
            if self._head is None:
                raise LayerNotFoundError("reading the next-token distribution needs a causal LM with an output head")
            if self.stop_after:
                raise ValueError("stop_after would skip the LM head whose logits were asked for")
            self._hand_off = LogitsHandOff(self.next_token_ids)
        self._thread: int | None = None

    # -- lifecycle (Hooks) -----------------------------------------------------------------------------------
    def _register(self) -> list:
        # thread_only: the thread that enters owns the reader
        self._thread = threading.get_ident() if self.thread_only else None
        handles = [self.decoder.owner.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        handles += [self.decoder.block(layer).register_forward_hook(self._make_layer_hook(layer)) for layer in self.layers]
        if self._head is not None:
            handles.append(self._head.register_forward_hook(self._head_hook))
        return handles

    def _on_remove(self) -> None:
        self._active = False
        self._values = {}
        if self._hand_off is not None:
            self._hand_off.clear()

    # -- hooks -----------------------------------------------------------------------------------------------
    def _foreign(self) -> bool:
        return self._thread is not None and threading.get_ident() != self._thread

    def _pre_hook(self, module, args, kwargs):
        if self._foreign():
            return None
        past = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        cache_position = kwargs.get("cache_position")
        start = self.prefill_cache_length
        is_decode = cache_length(past) > start or (
            cache_position is not None and cache_position.numel() > 0 and int(cache_position.reshape(-1)[0]) > start
        )
        self._values = {}
        if is_decode:
            self._active = False
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            mask = None  # a custom 4-D mask: fall back to the last position
        self._mask = mask
        self._positions = None
        self._active = True
        return None

    def _make_layer_hook(self, layer: int):
        deepest = self.layers[-1]

        def hook(module, args, output):
            if not self._active or self._foreign():
                return None
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            batch, seq_len = hidden.shape[0], hidden.shape[1]
            if self._positions is None:
                self._positions = last_token_positions(self._mask, batch, seq_len).to(hidden.device)
            rows = hidden[torch.arange(batch, device=hidden.device), self._positions]
            if self.neuron_indices is not None:
                idx = self._device_indices.get(hidden.device)
                if idx is None:
                    idx = self._device_indices[hidden.device] = self.neuron_indices.to(hidden.device)
                rows = rows.index_select(1, idx)
            # Only [batch, k] leaves the device.
            self._values[layer] = rows.detach().to("cpu", torch.float32)
            if layer == deepest:
                values, self._values = self._values, {}
                self._active = False
                if self._hand_off is not None:
                    self._hand_off.hold((values, seq_len, self._positions))  # completed by the LM head hook
                    return None
                self.on_prefill(values)
                if self.stop_after:
                    raise StopForward
            return None

        return hook


    def _head_hook(self, module, args, output):
        if self._foreign():
            return None
        logits = output[0] if isinstance(output, (tuple, list)) else output

        def last_logits(held):
            _, seq_len, positions = held
            if logits.shape[1] == seq_len:
                return logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)]
            return logits[:, -1, :]  # logits_to_keep=1 (generate): the last column, real under left padding

        done = self._hand_off.complete(last_logits)
        if done is not None:
            (values, _, _), summary = done
            values["next_token"] = summary
            self.on_prefill(values)
        return None


@contextlib.contextmanager
def capture(
    model: nn.Module,
    layers: Iterable[int] | str = "all",
    neuron_indices: torch.Tensor | Sequence[int] | None = None,
    *,
    stop_after: bool = False,
    prefill_cache_length: int = 0,
    next_token_ids: Sequence[int] | None = None,
    thread_only: bool = False,
):
    """Context manager collecting last-real-token hidden states of each prefill run inside it.

    Example
    -------
    >>> with capture(model, layers=[12], neuron_indices=[3, 17]) as cap:   # doctest: +SKIP
    ...     model(**batch)
    >>> cap.batches[0][12].shape                                            # doctest: +SKIP
    torch.Size([batch, 2])

    ``stop_after=True`` ends the forward pass after the deepest requested layer (saves compute when only
    features are wanted); the resulting :class:`StopForward` is swallowed here, so no logits are produced.
    ``prefill_cache_length`` is the length of a shared-prefix KV cache passed to the forward (see
    :class:`LastTokenReader`).
    Hooks are removed on exit, also when the body raises.
    """
    decoder = find_decoder_layers(model)
    chosen = range(1, len(decoder) + 1) if layers == "all" else layers
    sink = _Capture()
    with LastTokenReader(model, list(chosen), sink.batches.append, neuron_indices, stop_after,
                         prefill_cache_length, next_token_ids, thread_only):
        try:
            yield sink
        except StopForward:
            pass


class _Capture:
    def __init__(self) -> None:
        self.batches: list[dict[int, torch.Tensor]] = []

    def stacked(self) -> dict[int, torch.Tensor]:
        """All captured batches concatenated along the batch axis, per layer."""
        if not self.batches:
            return {}
        return {layer: torch.cat([b[layer] for b in self.batches]) for layer in self.batches[0]}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` positions counting real tokens only (a left-padded row's first real token is at 0; padding
    at 0 too): what ``generate`` computes, and what a plain forward pass needs for the same numbers."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def with_position_ids(encoding: dict) -> dict:
    """Add ``position_ids`` counting real tokens only, so left padding does not shift absolute positions.

    ``generate`` does this itself; a plain forward pass does not, and models with absolute position embeddings
    (GPT-2, OPT) then see different positions for a left-padded row than for the same prompt alone.
    """
    mask = encoding.get("attention_mask")
    if mask is None or "position_ids" in encoding:
        return encoding
    out = dict(encoding)
    out["position_ids"] = position_ids(mask)
    return out


class StepStateRecorder(Hooks):
    """Records chosen layers at the last column of *every* forward pass: the last prompt token of the prefill,
    then each token fed back during decoding. That is the state after every generated token, read by the same
    forward that generates, so a reasoning trace's step boundaries (or candidate steps in a search) are scored
    with no extra pass.

    ``states()`` returns ``{layer: [batch, forwards, width]}``: column 0 is the last prompt token (``s_0``),
    column ``j`` the state after generated token ``j - 1``. With ``all_positions`` every position of every forward
    is kept instead (one prefill of a whole trace: column ``i`` is token ``i``). Rows of a left-padded prefill are fine: the
    last column is every row's last real token. Use as a context manager; hooks are removed on exit.

    Only forward passes run by the thread that entered it are recorded: a decoding loop owns its recorder, and a
    prefill that another thread runs on the same model meanwhile (the sidecar scores prompts on its own thread
    while a search decodes) must not become the loop's "latest state" (it did: a batch of one, and an IndexError).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], *, neuron_indices=None,
                 dtype: torch.dtype = torch.float16, all_positions: bool = False):
        self.decoder = find_decoder_layers(model)
        self.layers = sorted(set(int(x) for x in layers))
        for layer in self.layers:
            self.decoder.block(layer)
        self.neuron_indices = None if neuron_indices is None else torch.as_tensor(neuron_indices, dtype=torch.long)
        self.dtype = dtype
        self.all_positions = all_positions  # keep every position of every forward (a prefill of a whole trace)
        self._columns: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._handles: list = []
        self._thread: int | None = None

    def _hook(self, layer: int):
        def hook(module, args, output):
            if threading.get_ident() != self._thread:
                return  # another thread's forward pass
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            col = hidden if self.all_positions else hidden[:, -1:, :]
            if self.neuron_indices is not None:
                col = col.index_select(2, self.neuron_indices.to(col.device))
            self._columns[layer].append(col.detach().to("cpu", self.dtype))
        return hook

    def _register(self) -> list:
        self._thread = threading.get_ident()  # the thread that enters owns the recorder
        return [self.decoder.block(layer).register_forward_hook(self._hook(layer)) for layer in self.layers]

    def states(self) -> dict[int, torch.Tensor]:
        return {layer: torch.cat(cols, dim=1) for layer, cols in self._columns.items() if cols}

    def take_last(self, layer: int) -> torch.Tensor:
        """The latest forward's last column of ``layer``, ``[batch, width]``, forgetting every earlier one (a decoding
        loop that needs only the state after the token it just fed keeps no history)."""
        last = self._columns[layer][-1][:, -1]
        self._columns[layer].clear()
        return last
