"""The answer-feature study (issue 31) on planted data: the monotone stack keeps a free signal's sign, and the
nested choice never sees the source it is judged on."""

from __future__ import annotations

import numpy as np
import torch

from valueprobe.calibration.answer_study import STACK_COLUMNS, AnswerData, _monotone_stack, report_markdown, study


def planted(n_per=60, sources=("s1", "s2", "s3", "s4"), width=16, seed=0) -> AnswerData:
    rng = np.random.default_rng(seed)
    rows, last, mean = [], [], []
    for i, s in enumerate(sources):
        for j in range(n_per):
            y = int(rng.random() < 0.5)
            lp = -abs(rng.normal(1.5 - y, 0.7))  # the answer's log-probability knows the label in every source
            h = rng.normal(0, 1, width)
            h[0] += (1.5 if y else -1.5) * (1 if s != "s4" else -1)  # the hidden signal flips on s4
            rows.append({"id": f"{s}-{j}", "dataset": s, "kind": "open", "label": y, "max_softmax": 0.5,
                         "answer_sum_logprob": lp, "answer_min_logprob": lp, "answer_mean_logprob": lp})
            last.append(h)
            mean.append(h + rng.normal(0, 0.1, width))
    reads = {"last": torch.tensor(np.array(last), dtype=torch.float32)[:, None],
             "answer_mean": torch.tensor(np.array(mean), dtype=torch.float32)[:, None]}
    reads["answer_min_token"] = reads["last"].clone()
    return AnswerData(rows, reads, [5], np.zeros(len(rows), dtype=int))


def test_the_monotone_stack_drops_a_free_signal_of_the_wrong_sign():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    X = np.column_stack([rng.normal(y, 1), -y + rng.normal(0, 0.5, 400), rng.normal(0, 1, (400, 3))])
    stack = _monotone_stack(X, y)  # the served fit's KindStacker(monotone=True), on the study's columns
    assert STACK_COLUMNS[1] not in stack.used_ and STACK_COLUMNS[0] in stack.used_  # wrong way: dropped, not flipped
    assert stack.params_["weight"][1] == 0


def test_the_study_scores_every_source_left_out_and_chooses_nested():
    data = planted()
    result = study(data, reads=[("last", 5), ("answer_mean", 5)], k_sparse=2, random_draws=2)
    assert set(result["sources"]) == {"s1", "s2", "s3", "s4"}
    s4 = result["sources"]["s4"]
    assert s4["reads"]["last@5"] < 0.5  # the hidden signal learned on s1-s3 ranks s4 the wrong way
    assert s4["free"]["answer_sum_logprob"] > 0.7
    # the inner leave-one-source-out over s1-s3 cannot know s4 flips, so s4's served score may fall below its
    # free signal; on s1-s3 (where s4 is among the fitting sources) it is chosen without their own rows
    for name in ("s1", "s2", "s3"):
        assert result["sources"][name]["served"] in {"probe", "stack", "answer_sum_logprob", "answer_min_logprob",
                                                     "answer_mean_logprob", "max_softmax"}
    text = report_markdown(result)
    assert "| s4 | open | 60 |" in text and "target min ≥ 0.78" in text
