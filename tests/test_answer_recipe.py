"""The answer-level recipe of issue 31, piece by piece: the stack's answer-side columns as the server computes them
(and fitting reads them), the answer pooled as an artifact reads it, the monotone stacker, and the nested choice of
the served mode (never picked on the source it is scored on)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from valueprobe.calibration.transfer import KindStacker, Side, loso_study
from valueprobe.plugin.readout import (ANSWER_STACK_FEATURES, ANSWER_STACK_LAYOUTS, LOGPROB_FLOOR, answer_columns,
                                       pool_answer)

V2 = ANSWER_STACK_LAYOUTS[1]


def test_answer_columns_are_the_log_probability_summaries_and_the_chance_level():
    lp = [-0.1, -2.0, -0.3]
    total, low, mean, options = answer_columns(V2[3:], lp, 4)
    assert total == pytest.approx(-2.4) and low == pytest.approx(-2.0) and mean == pytest.approx(-0.8)
    assert options == pytest.approx(np.log(4))
    assert answer_columns(["log_options"], lp, 0) == [0.0]  # open question: no chance level
    # an empty answer is the least confident one can be, and a near-impossible token is floored (finite)
    assert answer_columns(V2[3:], [], 2) == [LOGPROB_FLOOR, LOGPROB_FLOOR, LOGPROB_FLOOR, pytest.approx(np.log(2))]
    assert answer_columns(["answer_min_logprob"], [-1e9], 0) == [LOGPROB_FLOOR]
    with pytest.raises(ValueError, match="unknown answer stack column 'perplexity'"):
        answer_columns(["perplexity"], lp, 0)


def test_the_first_layout_is_kept_for_artifacts_fitted_before():
    assert ANSWER_STACK_LAYOUTS[0] == ANSWER_STACK_FEATURES and V2[:5] == ANSWER_STACK_FEATURES


def test_fitting_reads_the_columns_the_server_computes():
    rows = [{"kind": "choice", "max_softmax": 0.6, "option_entropy": 0.9, "token_logprobs": [-0.5], "n_options": 2,
             "answer_tokens": 1},
            {"kind": "open", "max_softmax": 0.3, "option_entropy": 2.0, "token_logprobs": [-0.2, -1.5, -0.1],
             "n_options": 0, "answer_tokens": 3},
            {"kind": "open", "max_softmax": 0.3, "option_entropy": 2.0, "token_logprobs": [], "answer_tokens": 0}]
    side = Side.from_answer_rows(rows, V2)
    for r, extra in zip(rows, side.extra):
        assert list(extra) == answer_columns(V2[3:], r["token_logprobs"], r.get("n_options", 0))
    # an older cache row (summaries, no token list) gives the same columns
    old = {"kind": "open", "max_softmax": 0.3, "option_entropy": 2.0, "answer_sum_logprob": -1.8,
           "answer_min_logprob": -1.5, "answer_mean_logprob": -0.6, "answer_tokens": 3}
    assert list(Side.from_answer_rows([old], V2).extra[0]) == pytest.approx(answer_columns(V2[3:], [-0.2, -1.5, -0.1]))
    assert Side.from_answer_rows(rows).extra.shape == (3, 2)  # the first layout: sum and min


def test_pool_answer_reads_the_last_token_or_the_mean():
    states = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    assert torch.equal(pool_answer(states, "last"), torch.tensor([5.0, 4.0]))
    assert torch.allclose(pool_answer(states, "mean"), torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="unknown answer read"):
        pool_answer(states, "max")


def _stack_data(n=600, seed=0):
    """Stack columns where the answer's sum log-probability is, in this fitting data, anti-correlated with being
    right (a quirk a new source need not share) and the value logit carries the signal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    value = y * 1.5 + rng.standard_normal(n)
    total = -y * 1.0 + rng.standard_normal(n)  # wrong way round
    cols = np.c_[value, rng.standard_normal(n), rng.standard_normal(n), total, rng.standard_normal(n),
                 rng.standard_normal(n), np.zeros(n)]
    return cols, y


def test_a_monotone_stack_drops_a_free_signal_that_points_the_wrong_way():
    X, y = _stack_data()
    free = KindStacker(names=V2).fit(X, y, X, y)
    assert free.params_["weight"][3] < 0  # an unconstrained stacker learns the quirk
    mono = KindStacker(names=V2, monotone=True).fit(X, y, X, y)
    assert mono.params_["weight"][3] == 0 and "answer_sum_logprob" not in mono.used_
    assert mono.params_["scale"][3] == 1 and mono.params_["weight"][0] > 0
    # a higher sum log-probability can then never lower the served probability
    lo, hi = X[:5].copy(), X[:5].copy()
    hi[:, 3] += 10
    assert (mono.predict_proba(hi) >= mono.predict_proba(lo)).all()
    # one free signal alone (a served mode): every other weight is 0
    alone = KindStacker(names=V2, monotone=True, only="answer_min_logprob").fit(X, y, X, y)
    assert alone.used_ == ["answer_min_logprob"] and np.count_nonzero(alone.params_["weight"]) <= 1


def test_the_served_mode_of_a_left_out_source_is_chosen_without_it():
    rng = np.random.default_rng(1)
    n, width = 480, 16
    sources = np.array(["a", "b", "c", "d"] * (n // 4))
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, width)) + y[:, None] * 0.3  # spread over every unit: the dense head wins
    side = Side(rng.uniform(0.2, 1, n) + 0.3 * y, rng.uniform(0, 1, n), np.array(["open"] * n),
                np.c_[rng.standard_normal(n) + y, rng.standard_normal(n), rng.standard_normal(n), np.zeros(n)])
    split = np.array(["train", "train", "calibration", "test"] * (n // 4))[rng.permutation(n)]
    study = loso_study(X, y, sources, side, split, max_fraction=1.0, tolerance=0.0, heads=("linear",), random_draws=3,
                       progress=False, k_grid=(16, 8, 4), stack_names=V2, monotone=True, k_criterion="mean+min",
                       free_modes=True)
    columns = {"stacked": "served_linear", "next_token": "next_token_stack", "value": "value_linear",
               **{m: m for m in ("free:logit_max_softmax", "free:answer_sum_logprob", "free:answer_min_logprob",
                                 "free:answer_mean_logprob")}}
    for s, r in study.rows.items():
        others = [o for t, o in study.rows.items() if t != s]
        means = {m: np.mean([o[c] if o.get(c) is not None else 0.5 for o in others]) for m, c in columns.items()}
        assert means[r["served_mode"]] == max(means.values())
        assert r["served"] == r[columns[r["served_mode"]]]
    assert study.k == 16 and all(r["random_k"] == 4 for r in study.rows.values())  # dense: random sets at k=4


def test_out_of_source_platt_flattens_probabilities_that_were_too_sure_on_left_out_sources():
    from valueprobe.calibration.transfer import out_of_source_platt

    rng = np.random.default_rng(2)
    probs, labels = [], []
    for _ in range(3):  # each left-out source: confident predictions that are right only 65% of the time
        p = rng.uniform(0.85, 0.99, 400)
        probs.append(p)
        labels.append((rng.uniform(size=400) < 0.65).astype(int))
    a, b = out_of_source_platt(probs, labels)
    from scipy.special import expit, logit

    flattened = expit(a * logit(np.concatenate(probs)) + b)
    assert abs(flattened.mean() - np.concatenate(labels).mean()) < 0.03  # now means what it says on average
    # a source is weighed as one source, however many questions it has
    a2, b2 = out_of_source_platt([probs[0], np.repeat(probs[1], 5)], [labels[0], np.repeat(labels[1], 5)])
    a3, b3 = out_of_source_platt([probs[0], probs[1]], [labels[0], labels[1]])
    assert a2 == pytest.approx(a3, rel=0.05) and b2 == pytest.approx(b3, rel=0.05, abs=0.05)


def test_fit_chooses_how_the_answer_is_read_and_the_artifact_says_so(qwen_model, tokenizer):
    """answer_read "auto": the leave-one-source-out layer scan of both reads decides; here only the answer's mean
    carries the (planted) signal, so the artifact reads the mean, and its served numbers come from that read."""
    from conftest import synthetic_featureset

    from valueprobe.calibration.extract import FeatureSet
    from valueprobe.calibration.fit import FitConfig, fit_artifact, served_answer_predictions
    from valueprobe.plugin import ArtifactData, PromptFormat, ValueProbe, save_artifact

    fs, _ = synthetic_featureset(qwen_model, tokenizer)
    rng = np.random.default_rng(4)
    for i, r in enumerate(fs.rows):
        lp = list(-rng.uniform(0, 2, 3))
        r.update(token_logprobs=lp, answer_tokens=3, answer="A", n_options=2 + 2 * (i % 2))
    shuffled = fs.features[torch.as_tensor(rng.permutation(len(fs.rows)))]  # the last token: no signal
    fs = FeatureSet(shuffled, fs.rows, {"answer_mean": fs.features, "answer_min_token": shuffled})
    data, card = fit_artifact(qwen_model, tokenizer, fs, model_name="tiny-qwen2", prompt_format=PromptFormat(),
                              config=FitConfig(random_draws=3, progress=False, answer_read="auto", heads=("linear",)),
                              token_position="answer_end")
    assert data.metadata["answer_read"] == "mean" and card["answer_read"] == "mean"
    assert set(card["read_scan"]) == {"last", "mean"}
    assert max(card["read_scan"]["mean"].values()) > max(card["read_scan"]["last"].values())
    assert json_list(data.metadata["stack_features"]) == list(V2)
    # each option count left out in turn, and the OOD distance scored on left-out sources
    assert set(card["loso_by_options"]["rows"]) == {"2 options", "4 options"}
    assert all(v is None or 0 <= v <= 1 for v in card["ood"]["loso_auroc"].values())
    assert 0 <= card["ood"]["test_flagged"] <= 1
    # the served row names what each kind serves
    from valueprobe.calibration.evaluate import served_label

    label = served_label(card["served_by_kind"], "answer token log-probs")
    assert card["test"]["all"][0]["name"] == f"served score ({label})"
    import tempfile

    path = tempfile.mkdtemp() + "/a.safetensors"
    save_artifact(ArtifactData(dict(data.tensors), dict(data.metadata)), path)
    probe = ValueProbe.load(path)
    p = served_answer_predictions(probe, fs)["probability"]
    from valueprobe.calibration.metrics import auroc_score

    assert auroc_score(fs.labels, p) > 0.75  # read from the mean, where the signal is


def json_list(text):
    import json

    return json.loads(text)


def test_a_monotone_stack_whose_every_signal_points_the_wrong_way_serves_the_base_rate():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 400)
    X = np.c_[np.zeros(400), -y + rng.standard_normal(400), y + rng.standard_normal(400)]  # ms down, entropy up
    stack = KindStacker(value_weight=False, monotone=True).fit(X, y, X, y)
    assert stack.used_ == [] and not stack.params_["weight"].any()
    assert stack.predict_proba(X[:3]) == pytest.approx([y.mean()] * 3, abs=0.05)


def test_bench_answer_splits_the_test_set_by_what_the_previous_artifact_saw():
    from valueprobe.bench.answer import by_source_on_test_split

    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    source = np.array(["seen-a", "new", "seen-b", "new"] * (n // 4))
    test = rng.random(n) < 0.5
    new = y + rng.normal(0, 1, n)  # ranks both sources
    seen = np.isin(source, ["seen-a", "seen-b"])
    previous = np.where(seen, y + rng.normal(0, 1, n), rng.normal(0, 1, n))  # ranks only the sources it saw
    table = by_source_on_test_split(y, source, test, new, previous, fitted_by_previous={"seen-a", "seen-b"})
    assert set(table) == {"new", "seen-a (previous fitted on it)", "seen-b (previous fitted on it)",
                          "all sources the previous artifact was fitted on", "all sources it never saw"}
    pooled = table["all sources the previous artifact was fitted on"]
    assert pooled["n"] == int((test & seen).sum()) == sum(table[f"{s} (previous fitted on it)"]["n"] for s in
                                                          ("seen-a", "seen-b"))
    from valueprobe.calibration.metrics import auroc_score

    assert pooled["new"] == pytest.approx(auroc_score(y[test & seen], new[test & seen]))
    assert table["all sources it never saw"]["change"] > 0.2
    assert abs(table["all sources the previous artifact was fitted on"]["change"]) < 0.2


@pytest.mark.parametrize("modes,want", [
    ({"choice": "stacked", "open": "stacked"}, "value neurons + F, per kind"),
    ({"choice": "free:answer_sum_logprob", "open": "next_token"},
     "choice: answer_sum_logprob alone, open: free signals stacked"),
    ({"choice": "value (no stacker)", "open": "value"}, "value neurons, calibrated"),
    ({"choice": "stacked", "open": "value (no stacker)"}, "choice: value neurons + F, open: value neurons"),
])
def test_the_served_score_is_named_by_what_each_kind_serves(modes, want):
    from valueprobe.calibration.evaluate import served_label

    assert served_label(modes, "F") == want
