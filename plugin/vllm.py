"""The probe inside vLLM's own forward pass.

vLLM runs the model in a worker (in the engine process), over flattened batches that mix prefills (possibly in
chunks), prefix-cache hits and decode steps. :class:`ProbeWorkerExtension` is a vLLM *worker extension*
(``worker_extension_cls``): once attached it hooks the probe's decoder layer and the logits processor in the
worker, finds in each scheduled batch the row that holds a request's last prompt token (the step whose scheduled
tokens reach the prompt's end: a whole prefill, the last chunk of a chunked one, or the one token vLLM recomputes
after a full prefix-cache hit), and keeps only the ``k`` neuron values there (plus, for stacked artifacts, the
``2 + letters`` next-token summary of that row's logits), keyed by request id. Nothing else leaves the worker;
the probability is computed on the caller's side by :meth:`ValueProbe.readout` (the same code as everywhere).

Bring your own vLLM::

    from vllm import LLM
    from valueprobe.plugin import ValueProbe
    from valueprobe.plugin.vllm import WORKER_EXTENSION, VllmProbe

    llm = LLM(model=folder, enforce_eager=True, worker_extension_cls=WORKER_EXTENSION)
    probe = VllmProbe.attach(ValueProbe.load("probe.safetensors"), llm)
    outputs = llm.generate(prompts, params)
    results = probe.take([o.request_id for o in outputs])   # {request_id: ProbeResult}

Residual stream: vLLM's decoder layers return ``(hidden, residual)`` with the residual add fused into the next
layer's norm; the Hugging Face ``hidden_states[layer]`` the probe was fitted on is their sum.

Compiled graphs: forward hooks do not run inside ``torch.compile``d graphs or CUDA graphs, so attaching to an
engine that compiles the model (no ``enforce_eager=True``) is refused rather than served empty.

Tensor parallelism: after each layer's all-reduce every rank holds the full residual, so each rank's hook sees
the same values; the caller reads rank 0's. Data-parallel replicas are separate engines: attach to each.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .fingerprint import config_fingerprint, params_sha256
from .hooks import LogitsHandOff, find_decoder_layers
from .nexttoken import prompt_kind

__all__ = ["WORKER_EXTENSION", "ProbeWorkerExtension", "VllmProbe", "CompiledModelError", "attach_args",
           "checkpoint_layer_sha256", "internal_request_id"]

WORKER_EXTENSION = "valueprobe.plugin.vllm.ProbeWorkerExtension"


def attach_args(probe, letter_ids, *, key: str | None = None, position: str = "last_prompt_token") -> tuple:
    """The arguments of the worker's ``valueprobe_attach`` RPC for ``probe`` (under ``key``, default its artifact
    id): the one place every caller (``VllmProbe``, the sidecar's vLLM engine) builds them."""
    return (key or probe.artifact_id, probe.layer, probe.neuron_indices.tolist(), letter_ids, position)


class CompiledModelError(RuntimeError):
    """The engine compiles the model, so a forward hook would read nothing."""


class ProbeWorkerExtension:
    """Methods added to vLLM's worker (``self`` is the worker); called through ``collective_rpc``.

    Several probes can be attached at once, each under a key (the artifact id), so that requests in flight
    during a hot reload are read by the artifact they started with. Readouts wait in the worker until taken:
    ``{request_id: {key: [k values, then the next-token summary]}}``.
    """

    def valueprobe_attach(self, key: str, layer: int, neuron_indices: Sequence[int],
                          letter_ids: Sequence[int] | None, position: str = "last_prompt_token"):
        """Hook a probe under ``key``. ``position="answer_end"``: keep, for every request in every step, the ``k``
        values at the last token that step fed it (overwritten each step), so that when a request finishes its
        entry holds the state at the last token it was fed: an answer's last token when it ended at an
        end-of-answer token (the step that fed it emitted the end). No next-token summary is kept for it.
        ``position="answer_mean"``: the same, averaged over the answer positions fed so far (each counted once,
        by absolute position): a running sum and count per request (what an ``answer_read: mean`` artifact reads),
        the prompt's last token while no answer token was fed yet."""
        runner = self.model_runner
        cfg = runner.vllm_config
        mode = getattr(cfg.compilation_config, "mode", None)
        if mode is None:
            mode = getattr(cfg.compilation_config, "level", 0)
        eager = bool(getattr(cfg.model_config, "enforce_eager", False))
        if not eager or int(getattr(mode, "value", mode) or 0) != 0:
            raise CompiledModelError(
                "valueprobe reads the residual stream with a forward hook, which does not run inside torch.compile "
                "or CUDA graphs: start vLLM with enforce_eager=True (serve --engine vllm does)")
        if not hasattr(self, "_vp_lock"):
            self._vp_lock = threading.Lock()
            self._vp_results: dict[str, dict] = {}  # request id -> key -> values (see store)
            self._vp_handles: dict[str, list] = {}
        self.valueprobe_detach(key)
        model = runner.get_model()
        block = find_decoder_layers(model).block(layer)
        idx = torch.as_tensor(list(neuron_indices), dtype=torch.long)
        letters = list(letter_ids) if letter_ids is not None else None
        hand_off = LogitsHandOff(letters) if letters is not None else None

        def store(rid: str, values) -> None:  # k values, or an answer_mean entry (see sums)
            with self._vp_lock:
                self._vp_results.setdefault(rid, {})[key] = values

        answer = position in ("answer_end", "answer_mean")
        # answer_mean: request id -> (sum of the k values over the answer positions summed so far, how many, the
        # values at the last token fed): by absolute position, so a request skipped for a step, preempted and
        # recomputed, or fed several answer tokens in one step (a prefix-cache hit on resume) counts each answer
        # position once. Kept until vLLM forgets the request (``runner.requests``), not just while it is scheduled.
        sums: dict[str, tuple[torch.Tensor | None, int, torch.Tensor]] = {}

        def sum_answer_positions(hidden, residual, rows) -> None:
            batch, starts = runner.input_batch, runner.query_start_loc.np
            live = getattr(runner, "requests", None)
            live = set(live) if live is not None else set(batch.req_ids)
            for rid in [r for r in sums if r not in live]:
                del sums[rid]
            device_idx = idx.to(hidden.device)
            # the k values at every row's last fed token in one gather; sums and values stay on the device until
            # taken (_readout_values), so a step costs no device-to-host copy per request
            at = torch.tensor([r for _, r, _ in rows], device=hidden.device)
            lasts = hidden.index_select(0, at)
            if residual is not None:
                lasts = lasts + residual.index_select(0, at)
            lasts = lasts.index_select(1, device_idx).double()
            for (i, _, rid), last in zip(rows, lasts):
                total, count, _ = sums.get(rid, (None, 0, None))
                first, end = int(starts[i]), int(starts[i + 1])
                computed, prompt = int(batch.num_computed_tokens_cpu[i]), int(batch.num_prompt_tokens[i])
                # this step feeds positions computed .. computed + (end - first) - 1; answer positions not yet
                # summed start at prompt + count
                start = max(prompt + count, computed)
                if start < computed + (end - first):
                    r0 = first + start - computed
                    seg = hidden[r0:end] if residual is None else hidden[r0:end] + residual[r0:end]
                    part = seg.index_select(1, device_idx).double().sum(dim=0)
                    total = part if total is None else total + part
                    count += end - r0
                sums[rid] = entry = (total, count, last)
                store(rid, entry)  # made a list of k values when taken (_readout_values), not every step

        def layer_hook(module, args, output):
            hidden, residual = (output[0], output[1]) if isinstance(output, (tuple, list)) else (output, None)
            rows = rows_last_fed(runner) if answer else rows_completing_prompt(runner)
            if not rows:
                return None
            if position == "answer_mean":
                sum_answer_positions(hidden, residual, rows)
                return None
            at = torch.tensor([r for _, r, _ in rows], device=hidden.device)
            state = hidden.index_select(0, at)
            if residual is not None:
                state = state + residual.index_select(0, at)
            values = state.index_select(1, idx.to(state.device)).float().cpu().tolist()
            if hand_off is None or answer:
                for (_, _, rid), v in zip(rows, values):
                    store(rid, v)
            else:  # completed by the logits hook of this same step (logits are per request: batch index i)
                hand_off.hold([(i, rid, v) for (i, _, rid), v in zip(rows, values)])
            return None

        def logits_hook(module, args, output):
            if output is None:
                return None
            done = hand_off.complete(lambda held: output[torch.tensor([i for i, _, _ in held], device=output.device)])
            if done is not None:
                held, summary = done
                for (_, rid, v), s in zip(held, summary.tolist()):
                    store(rid, v + s)
            return None

        handles = [block.register_forward_hook(layer_hook)]
        if letters is not None and not answer:
            handles.append(model.logits_processor.register_forward_hook(logits_hook))
        self._vp_handles[key] = handles
        return True

    def valueprobe_detach(self, key: str | None = None):
        """Remove one attached probe (or all)."""
        handles = getattr(self, "_vp_handles", {})
        for k in [key] if key is not None else list(handles):
            for h in handles.pop(k, []):
                h.remove()
        return True

    def valueprobe_attached(self) -> list[str]:
        """Keys of the probes hooked in this worker."""
        return sorted(getattr(self, "_vp_handles", {}))

    def valueprobe_take(self, request_ids: Sequence[str] | None = None) -> dict[str, dict[str, list[float]]]:
        """Pop the readouts that are ready: all (``None``), or those of ``request_ids`` (a caller's id also
        matches vLLM's internal ``<id>-<suffix>``), keyed by the id asked for."""
        if not hasattr(self, "_vp_lock"):
            return {}
        with self._vp_lock:
            if request_ids is None:
                out, self._vp_results = self._vp_results, {}
            else:
                out = {}
                for asked in request_ids:
                    internal = internal_request_id(asked, self._vp_results)
                    if internal is not None:
                        out[asked] = self._vp_results.pop(internal)
        return {rid: {key: _readout_values(v) for key, v in entry.items()} for rid, entry in out.items()}

    def valueprobe_fingerprint(self, layer: int) -> dict[str, str]:
        """Config fields and the hooked layer's weight hash, read from the checkpoint files vLLM loaded (its
        CPU and GPU kernels repack or fuse the live parameters, so those are not hashed)."""
        model_config = self.model_runner.vllm_config.model_config
        fields = config_fingerprint(model_config.hf_config)
        fields["layer_weights_sha256"] = checkpoint_layer_sha256(model_config.model, layer)
        return fields


def checkpoint_layer_sha256(folder: str, layer: int) -> str:
    """The hash :func:`~valueprobe.plugin.fingerprint.layer_weights_sha256` gives a Hugging Face model's
    decoder layer ``layer`` (1-based), computed from a local safetensors checkpoint without loading the model:
    the tensors named ``<prefix>.layers.<layer - 1>.<name>`` under their block-relative names. Returns
    ``"unavailable"`` (which never matches) when the folder has no safetensors files."""
    import re
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    pattern = re.compile(rf"^(?:.*\.)?layers\.{layer - 1}\.(.+)$")
    params = []
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                m = pattern.match(key)
                if m:
                    params.append((m.group(1), sf.get_tensor(key)))
    return params_sha256(params) if params else "unavailable"


def rows_completing_prompt(runner) -> list[tuple[int, int, str]]:
    """``(batch index, token row, request id)`` of the requests whose prompt ends in the step being run: their
    scheduled tokens reach the prompt's last token (a whole prefill, the last chunk of a chunked one, or the one
    token recomputed after a full prefix-cache hit). Read from the model runner's persistent batch, which holds
    this step's layout while its forward runs (``num_computed_tokens`` are those before the step)."""
    batch = runner.input_batch
    n = batch.num_reqs
    starts = runner.query_start_loc.np[: n + 1]
    computed = batch.num_computed_tokens_cpu[:n]
    prompt = batch.num_prompt_tokens[:n]
    # vectorised: this runs at every step, and decode-only steps (the common case) must cost next to nothing
    hits = np.flatnonzero((computed < prompt) & (prompt <= computed + np.diff(starts)))
    return [(int(i), int(starts[i] + prompt[i] - 1 - computed[i]), batch.req_ids[i]) for i in hits]


def rows_last_fed(runner) -> list[tuple[int, int, str]]:
    """``(batch index, token row, request id)`` of every request in the step being run, at the last token the step
    feeds it (a decode step's one token; a prefill's, or a prefill chunk's, last)."""
    batch = runner.input_batch
    n = batch.num_reqs
    starts = runner.query_start_loc.np[: n + 1]
    return [(i, int(starts[i + 1]) - 1, batch.req_ids[i]) for i in range(n) if starts[i + 1] > starts[i]]


def _readout_values(value) -> list[float]:
    """A stored readout as the caller gets it: a list as stored, or an answer_mean entry ``(sum, count, last)``
    as the mean of its answer positions (the values at the last token fed while no answer token was fed yet)."""
    if isinstance(value, tuple):
        total, count, last = value
        return (total / count).tolist() if count else last.tolist()
    return value


def internal_request_id(request_id: str, known: Iterable[str]) -> str | None:
    """vLLM may suffix the caller's request id internally (``<id>-<random>``); map it back."""
    for rid in known:
        if rid == request_id or rid.startswith(f"{request_id}-"):
            return rid
    return None


class VllmProbe:
    """A :class:`~valueprobe.plugin.probe.ValueProbe` attached to a vLLM engine (``LLM`` or ``AsyncLLM``)."""

    def __init__(self, probe, engine, letter_ids):
        self.probe = probe
        self.engine = engine
        self.letter_ids = letter_ids
        self.kinds: dict[str, tuple[str, int]] = {}

    @classmethod
    def check_compatible(cls, probe, fields: dict[str, str], tokenizer, *, strict: bool = True) -> list[str]:
        """Compare the worker's model fingerprint and the engine's tokenizer with the artifact's, as
        :meth:`~valueprobe.plugin.probe.ValueProbe.check_compatible` does for a Hugging Face model."""
        from .artifact import FingerprintMismatchError

        mismatched, what = probe.fingerprint_mismatch(fields, tokenizer)
        if mismatched and strict:
            raise FingerprintMismatchError("vLLM " + what, mismatched)
        if mismatched:
            warnings.warn("vLLM " + what + " Attached anyway (check_fingerprint=False): its scores are meaningless "
                          "for this model.", RuntimeWarning, stacklevel=3)
        return mismatched

    @classmethod
    def attach(cls, probe, llm, *, check_fingerprint: bool = True) -> VllmProbe:
        """Attach to a synchronous ``vllm.LLM`` started with ``worker_extension_cls=WORKER_EXTENSION``."""
        tokenizer = llm.get_tokenizer()
        fields = llm.collective_rpc("valueprobe_fingerprint", args=(probe.layer,))[0]
        cls.check_compatible(probe, fields, tokenizer, strict=check_fingerprint)
        letters = probe.letter_ids(tokenizer) if probe.needs_next_token else None
        llm.collective_rpc("valueprobe_attach", args=attach_args(probe, letters))
        return cls(probe, llm, letters)

    @classmethod
    async def attach_async(cls, probe, engine, *, check_fingerprint: bool = True) -> VllmProbe:
        """Attach to a ``vllm.v1.engine.async_llm.AsyncLLM`` started with ``worker_extension_cls=WORKER_EXTENSION``;
        ``tokenizer`` for the fingerprint is the engine's."""
        import inspect

        tokenizer = engine.get_tokenizer() if callable(getattr(engine, "get_tokenizer", None)) else engine.tokenizer
        if inspect.isawaitable(tokenizer):  # async in some vLLM versions
            tokenizer = await tokenizer
        fields = (await engine.collective_rpc("valueprobe_fingerprint", args=(probe.layer,)))[0]
        cls.check_compatible(probe, fields, tokenizer, strict=check_fingerprint)
        letters = probe.letter_ids(tokenizer) if probe.needs_next_token else None
        await engine.collective_rpc("valueprobe_attach", args=attach_args(probe, letters))
        return cls(probe, engine, letters)

    async def take_async(self, request_ids: Sequence[str], prompts=None) -> dict:
        """:meth:`take` for an ``AsyncLLM``: call it once a request's first output has arrived (its prefill ran)."""
        raw = (await self.engine.collective_rpc("valueprobe_take", args=(list(request_ids),)))[0]
        return self._results_for(raw, request_ids, prompts)

    def _results_for(self, raw, request_ids, prompts):
        key = self.probe.artifact_id
        out_raw, kinds = {}, {}
        for i, rid in enumerate(request_ids):
            if key in raw.get(rid, {}):
                out_raw[rid] = raw[rid][key]
                if prompts is not None:
                    kinds[rid] = prompt_kind(prompts[i])
        return self.results(out_raw, kinds)

    def results(self, raw: dict[str, list[float]], kinds: dict[str, tuple[str, int]] | None = None) -> dict:
        """Worker readouts (``k`` values, then the next-token summary) -> ``{request_id: ProbeResult}``."""
        if not raw:
            return {}
        ids = list(raw)
        k = self.probe.k
        values = torch.tensor([raw[r][:k] for r in ids], dtype=torch.float32)
        next_token = torch.tensor([raw[r][k:] for r in ids]) if self.letter_ids is not None else None
        kinds = kinds or {}
        rows = self.probe.readout(values, next_token, [kinds.get(r, ("open", 0)) for r in ids])
        return dict(zip(ids, rows))

    def take(self, request_ids: Sequence[str], prompts=None) -> dict:
        """``{request_id: ProbeResult}`` for finished prefills of ``request_ids`` (synchronous ``LLM``).
        ``prompts`` (the structured prompts, same order) give each row's kind (multiple choice or open)."""
        raw = self.engine.collective_rpc("valueprobe_take", args=(list(request_ids),))[0]
        return self._results_for(raw, request_ids, prompts)
