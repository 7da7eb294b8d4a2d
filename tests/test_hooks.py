"""The hook reads exactly what output_hidden_states reports, for every family, both padding sides."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_model

from valueprobe.plugin.hooks import (
    LayerNotFoundError,
    capture,
    find_decoder_layers,
    last_token_positions,
    with_position_ids,
)

PROMPTS = ["What is the capital of France?", "Which planet is largest? Answer with the letter only.", "Paris"]


def _encode(tokenizer, side):
    tokenizer.padding_side = side
    try:
        return tokenizer(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tokenizer):
    return request.param, build_model(request.param, len(tokenizer))


@pytest.mark.parametrize("side", ["left", "right"])
def test_hook_equals_output_hidden_states(family_model, tokenizer, side):
    family, model = family_model
    enc = _encode(tokenizer, side)
    n_layers = len(find_decoder_layers(model))
    with torch.no_grad(), capture(model, "all") as cap:
        out = model(**enc, output_hidden_states=True)
    assert len(cap.batches) == 1
    positions = last_token_positions(enc["attention_mask"], 3, enc["input_ids"].shape[1])
    if side == "left":
        assert (positions == enc["input_ids"].shape[1] - 1).all()
    else:
        assert positions.tolist() == (enc["attention_mask"].sum(1) - 1).tolist()
    rows = torch.arange(3)
    # Layers 1..L-1 are raw block outputs in hidden_states; the last entry carries the final norm.
    for layer in range(1, n_layers):
        expected = out.hidden_states[layer][rows, positions].float()
        assert torch.equal(cap.batches[0][layer], expected), f"{family} layer {layer} ({side} padding)"
    assert cap.batches[0][n_layers].shape == (3, model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else 32)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_one_by_one(family_model, tokenizer, side):
    family, model = family_model
    enc = _encode(tokenizer, side)
    with torch.no_grad(), capture(model, [2], neuron_indices=[0, 5, 31]) as cap:
        model(**with_position_ids(enc))
    batched = cap.batches[0][2]
    assert batched.shape == (3, 3)
    for i, prompt in enumerate(PROMPTS):
        single = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad(), capture(model, [2], neuron_indices=[0, 5, 31]) as cap1:
            model(**single)
        torch.testing.assert_close(cap1.batches[0][2][0], batched[i], rtol=1e-4, atol=1e-5,
                                   msg=f"{family}: row {i} differs between batch and single ({side} padding)")


def test_generate_scores_prefill_only(tokenizer):
    model = build_model("llama", len(tokenizer))
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    with torch.no_grad(), capture(model, [1, 3], neuron_indices=[1, 2]) as prefill:
        model(**enc)
    with torch.no_grad(), capture(model, [1, 3], neuron_indices=[1, 2]) as during:
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4  # decode steps did run
    assert len(during.batches) == 1  # ...but only the prefill was recorded
    for layer in (1, 3):
        torch.testing.assert_close(during.batches[0][layer], prefill.batches[0][layer], rtol=1e-5, atol=1e-6)


def test_hooks_removed_and_stop_after(tokenizer):
    model = build_model("gpt2", len(tokenizer))
    decoder = find_decoder_layers(model)
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    with capture(model, [1], stop_after=True) as cap:
        model(**enc)
        pytest.fail("stop_after must end the forward pass")  # pragma: no cover
    assert cap.batches[0][1].shape == (1, 32)
    assert not decoder.layers[0]._forward_hooks and not decoder.owner._forward_pre_hooks
    with pytest.raises(RuntimeError), capture(model, [1]):
        raise RuntimeError("body failure")
    assert not decoder.layers[0]._forward_hooks, "hooks must be removed when the body raises"


def test_unknown_layer_raises(tokenizer):
    model = build_model("opt", len(tokenizer))
    with pytest.raises(LayerNotFoundError, match="out of range"):
        with capture(model, [4]):
            pass
    with pytest.raises(LayerNotFoundError):
        find_decoder_layers(torch.nn.Linear(2, 2))


def test_step_recorder_ignores_forward_passes_of_other_threads(qwen_model, tokenizer):
    """A search's recorder must not take a prefill another thread runs on the same model (the sidecar's scoring
    thread) for the state after its own token: found by concurrent fuzzing as an IndexError in a search."""
    import threading

    from valueprobe.plugin.hooks import StepStateRecorder

    ids = torch.tensor([tokenizer("What is the capital of France?")["input_ids"]])
    with StepStateRecorder(qwen_model, [2]) as rec:
        other = threading.Thread(target=lambda: qwen_model(torch.cat([ids, ids])))
        other.start()
        other.join()
        assert rec.states() == {}
        qwen_model(ids)
        assert rec.states()[2].shape[:2] == (1, 1)
