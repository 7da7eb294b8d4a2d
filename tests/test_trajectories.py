"""Reasoning traces: step splitting, boundaries, answer parsing, and states recorded during generation equal to
states re-read by a prefill of the whole trace."""

import torch

from valueprobe.calibration.data import Question
from valueprobe.calibration.trajectories import (
    final_answer,
    generate_traces,
    load_traces,
    split_steps,
    step_boundaries,
    trace_states,
)


def test_split_steps_skips_blank_lines_and_keeps_ends():
    text = "First 2+3=5\n\n  Then 5*2=10\nAnswer: 10"
    steps = split_steps(text)
    assert [s for s, _ in steps] == ["First 2+3=5", "Then 5*2=10", "Answer: 10"]
    assert [text[e - 1] for _, e in steps] == ["5", "0", "0"]
    assert steps[-1][1] == len(text)


def test_final_answer_prefers_the_answer_line():
    assert final_answer("3 apples + 4 = 7\nAnswer: 1,234") == "1234"
    assert final_answer("so the answer is $42.") == "42"
    assert final_answer("she has 5 then 8") == "8"
    assert final_answer("no numbers") == ""


def test_step_boundaries_point_at_the_token_that_ends_each_step(tokenizer):
    text = "add 2 and 3\nthat is 5\n\nAnswer: 5"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    steps, ends = step_boundaries(tokenizer, ids)
    assert steps == ["add 2 and 3", "that is 5", "Answer: 5"]
    assert ends == sorted(ends) and len(set(ends)) == 3 and ends[-1] == len(ids) - 1
    for step, end in zip(steps[:-1], ends[:-1]):
        upto = tokenizer.decode(ids[: end + 1])
        assert step in upto and "\n" in upto[upto.index(step):]   # the end token carries the newline
        assert "\n" not in tokenizer.decode(ids[:end])[tokenizer.decode(ids[:end]).rfind(step.split()[0]):]


def _newline_prone(tokenizer):
    """A tiny random model whose newline logit is large on about half of its states, so traces have steps."""
    from conftest import build_model

    model = build_model("qwen2", len(tokenizer))
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        model.lm_head.weight[newline] = 3 * torch.randn(model.lm_head.weight.shape[1], generator=g)
    return model


def test_states_recorded_while_generating_equal_a_prefill_of_the_trace(tokenizer, tmp_path):
    qwen_model = _newline_prone(tokenizer)
    problems = [Question(f"p-{i}", f"What is {i} plus {i + 1}?", str(2 * i + 1), None, "numeric", "toy")
                for i in range(3)]
    out, states_dir = tmp_path / "traces.jsonl", tmp_path / "states"
    traces = generate_traces(qwen_model, tokenizer, problems, out, model_name="tiny", n_samples=2,
                             max_new_tokens=24, rows_per_batch=4, layers=[1, 2], states_dir=states_dir,
                             progress=False)
    assert len(traces) == 6 and {t["problem"] for t in traces} == {p.id for p in problems}
    assert all(t["label"] in (0, 1) and len(t["steps"]) == len(t["step_ends"]) for t in traces)
    assert sum(len(t["steps"]) for t in traces) >= 6  # multi-step traces, so boundaries are really compared
    # resumable: a second call generates nothing new
    assert len(generate_traces(qwen_model, tokenizer, problems, out, model_name="tiny", n_samples=2,
                               max_new_tokens=24, states_dir=states_dir, progress=False)) == 6
    recorded = trace_states(None, tokenizer, traces, states_dir=states_dir, progress=False)
    by_prefill = trace_states(qwen_model, tokenizer, load_traces(out), layers=[1, 2],
                              problems={p.id: p for p in problems}, progress=False)
    for a, b, t in zip(recorded.states, by_prefill.states, traces):
        assert a.shape == b.shape == (1 + len(t["steps"]), 2, qwen_model.config.hidden_size)
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
