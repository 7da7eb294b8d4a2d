"""The search benchmark's bookkeeping on synthetic traces with a planted value neuron: heads are fitted out of
fold, self-consistency votes, best-of-n follows the planted value, paired tests and the target verdict."""

import numpy as np
import torch
from test_dopamine import planted_traces

from valueprobe.bench.search import fit_fold_heads, fold_of, from_traces, report
from valueprobe.calibration.metrics import mcnemar_p
from valueprobe.calibration.trajectories import TraceSet


def synthetic_trace_set(n_problems=40, per_problem=4):
    states, rewards, problems = planted_traces(n_problems=n_problems, per_problem=per_problem)
    traces = []
    for i, (p, r) in enumerate(zip(problems, rewards)):
        # right traces answer "7"; wrong ones disagree with each other unless they are the second sample
        wrong = "1" if i % per_problem == 1 else str(100 + i)
        traces.append({"id": f"{p}#{i % per_problem}", "problem": p, "sample": i % per_problem, "label": int(r),
                       "prediction": "7" if r else wrong, "tokens": [0] * (10 + i % 3), "truncated": False})
    return TraceSet(traces, [torch.tensor(s, dtype=torch.float32)[:, None, :] for s in states], [5])


def test_heads_are_fitted_out_of_fold_and_best_of_n_follows_the_planted_value():
    ts = synthetic_trace_set()
    folds = 3
    heads, sizes = fit_fold_heads(ts, 5, folds, objective="td", epochs=30)
    fold = [fold_of(t["problem"], folds) for t in ts.traces]
    assert fold_of("p3", folds) == fold_of("p3", folds)
    for f in range(folds):
        assert sizes[f] == sum(x != f for x in fold) < len(ts.traces)
    per = from_traces(ts, heads, layer=5, folds=folds)
    by_problem = {}
    for t in ts.traces:
        by_problem.setdefault(t["problem"], []).append(t)
    for p, tr in by_problem.items():
        labels = [t["label"] for t in tr]
        assert per["sample"][p]["correct"] == tr[0]["label"]
        assert per["sample"][p]["expected"] == np.mean(labels)
        assert per["self-consistency"][p]["tokens"] == sum(len(t["tokens"]) + 1 for t in tr)
        right, wrong_ones = sum(labels), [t for t in tr if not t["label"]]
        # a majority of "7" wins the vote; the only other repeated answer is "1" (sample 1, if wrong)
        if right >= 2:
            assert per["self-consistency"][p]["correct"] == 1
        elif right == 0:
            assert per["self-consistency"][p]["correct"] == 0
        assert len(wrong_ones) == len(tr) - right
    mixed = [p for p, tr in by_problem.items() if 0 < sum(t["label"] for t in tr) < len(tr)]
    best = np.mean([per["best-of-n"][p]["correct"] for p in mixed])
    expected = np.mean([per["sample"][p]["expected"] for p in mixed])
    assert best > expected + 0.2  # the planted value picks right traces among mixed ones


def test_report_pairs_strategies_on_common_problems_and_states_the_verdict(tmp_path):
    ts = synthetic_trace_set()
    heads, sizes = fit_fold_heads(ts, 5, 3, epochs=10)
    problems = sorted({t["problem"] for t in ts.traces})
    rng = np.random.default_rng(0)
    greedy = rng.integers(0, 2, len(problems))
    beam = np.where(rng.random(len(problems)) < 0.8, 1, greedy)
    records = [{"problem": p, "strategy": "greedy", "correct": int(g), "tokens": 12} for p, g in zip(problems, greedy)]
    records += [{"problem": p, "strategy": "value-beam", "correct": int(b), "tokens": 50}
                for p, b in zip(problems, beam)][:-2]  # two problems not searched yet: left out of every row
    result, md = report(ts, heads, sizes, records, layer=5, folds=3, width=4, objective="td",
                        plot_path=tmp_path / "search.png")
    assert result["problems"] == len(problems) - 2
    rows = result["strategies"]
    assert rows["greedy"]["accuracy"] == greedy[:-2].mean() and rows["value-beam"]["tokens_per_problem"] == 50
    assert rows["greedy"]["ci95"][0] < rows["greedy"]["accuracy"] < rows["greedy"]["ci95"][1]
    test = next(t for t in result["paired"] if (t["a"], t["b"]) == ("value-beam", "greedy"))
    assert test["p_mcnemar"] == mcnemar_p(greedy[:-2], beam[:-2])
    assert test["a_only"] == int(((beam[:-2] == 1) & (greedy[:-2] == 0)).sum())
    assert "NOT MET" in md and "random step selection" in md.lower()
    assert (tmp_path / "search.png").stat().st_size > 0


def test_group_centered_probe_ranks_within_a_problem_not_across():
    """Easy problems sit high on feature 0 (all their answers right), while within a problem the right answers
    sit high on feature 1: a readout of raw states learns feature 0, the centred one feature 1 and picks a
    problem's right answer."""
    import pytest
    from sklearn.linear_model import LogisticRegression

    from valueprobe.calibration.probes import GroupCenteredProbe

    rng = np.random.default_rng(0)

    def problems(n):
        X, y, g = [], [], []
        for p in range(n):
            easy = rng.random() < 0.5
            labels = np.ones(4, int) if easy else rng.permutation([1, 0, 0, 0])
            feats = rng.normal(size=(4, 6))
            feats[:, 0] += 4.0 * easy
            feats[:, 1] += 1.5 * labels * (not easy)
            X.append(feats)
            y.append(labels)
            g += [p] * 4
        return np.concatenate(X), np.concatenate(y), np.array(g)

    X, y, g = problems(200)
    centred = GroupCenteredProbe().fit(X, y, g)
    plain = LogisticRegression(C=0.01, max_iter=2000).fit(X, y)
    assert centred.n_groups_ == sum(0 < y[g == p].mean() < 1 for p in np.unique(g))
    Xt, yt, gt = problems(200)
    picks = {"centred": [], "plain": []}
    for p in np.unique(gt):
        idx = np.flatnonzero(gt == p)
        if yt[idx].all():
            continue
        picks["centred"].append(yt[idx][np.argmax(centred.decision_function(Xt[idx]))])
        picks["plain"].append(yt[idx][np.argmax(plain.decision_function(Xt[idx]))])
    assert np.mean(picks["centred"]) > np.mean(picks["plain"]) + 0.1 and np.mean(picks["centred"]) > 0.6
    with pytest.raises(ValueError, match="both labels"):
        GroupCenteredProbe().fit(X[y == 1][:8], np.r_[np.ones(7, int), 0], np.arange(8))


def test_centred_best_of_n_is_reported_out_of_fold(tmp_path):
    from valueprobe.bench.search import fit_fold_rankers

    ts = synthetic_trace_set()
    heads, sizes = fit_fold_heads(ts, 5, 3, epochs=10)
    rankers = fit_fold_rankers(ts, 5, 3)
    per = from_traces(ts, heads, layer=5, folds=3, rankers=rankers)
    mixed = [p for p in per["sample"] if 0 < per["sample"][p]["expected"] < 1]
    assert np.mean([per["best-of-n-centered"][p]["correct"] for p in mixed]) > \
        np.mean([per["sample"][p]["expected"] for p in mixed]) + 0.1  # the planted value (rewards are noisy draws)
    result, md = report(ts, heads, sizes, [], layer=5, folds=3, width=4, objective="td", rankers=rankers)
    assert "best-of-n-centered" in result["strategies"] and "not a pre-registered result" in md
    assert any((t["a"], t["b"]) == ("best-of-n-centered", "self-consistency") for t in result["paired"])


def test_a_strategy_added_later_is_compared_on_its_own_problems():
    ts = synthetic_trace_set()
    heads, sizes = fit_fold_heads(ts, 5, 3, epochs=10)
    problems = sorted({t["problem"] for t in ts.traces})
    records = [{"problem": p, "strategy": s, "correct": i % 2, "tokens": 9} for i, p in enumerate(problems)
               for s in ("greedy", "value-beam")]
    records += [{"problem": p, "strategy": "value-beam-centered", "correct": 1, "tokens": 40} for p in problems[:10]]
    result, md = report(ts, heads, sizes, records, layer=5, folds=3, width=4, objective="td")
    assert result["problems"] == len(problems)  # the main table is not cut to the later strategy's problems
    later = result["added_later"]
    assert later["problems"] == 10 and later["strategies"]["value-beam-centered"]["accuracy"] == 1.0
    assert later["strategies"]["greedy"]["accuracy"] == np.mean([i % 2 for i in range(10)])
    assert {t["b"] for t in later["paired"]} == {"greedy", "self-consistency", "sample", "value-beam"}
    assert "centred readout" in md


def test_generate_writes_records_for_each_strategy_with_out_of_fold_values(tmp_path, tokenizer):
    """The generating half on a tiny model: greedy, value-beam (head) and value-beam-centered (ranker), one record
    per problem and strategy, resumable."""
    from test_trajectories import _newline_prone

    from valueprobe.bench.search import generate, load_records
    from valueprobe.calibration.data import Question
    from valueprobe.calibration.dopamine import fit_value_head
    from valueprobe.calibration.probes import GroupCenteredProbe

    model = _newline_prone(tokenizer)
    width = model.config.hidden_size
    rng = np.random.default_rng(0)
    states = [rng.normal(size=(3, width)) for _ in range(24)]
    y = np.array([i % 2 for i in range(24)])
    heads = {f: fit_value_head(states, y, epochs=3) for f in range(2)}
    rankers = {f: GroupCenteredProbe().fit(np.stack([s[-1] for s in states]), y, np.arange(24) // 4)
               for f in range(2)}
    problems = [Question(f"t-{i}", f"What is {i} plus {i}?", str(2 * i), None, "numeric", "toy") for i in range(3)]
    out = tmp_path / "search.jsonl"
    kwargs = dict(layer=2, out=out, folds=2, width=2, batch=2, max_steps=2, step_tokens=6, answer_tokens=12,
                  strategies=("greedy", "value-beam", "value-beam-centered"), rankers=rankers, echo=lambda *_: None)
    generate(model, tokenizer, problems, heads, {0: 12, 1: 12}, **kwargs)
    records = load_records(out)
    assert sorted((r["problem"], r["strategy"]) for r in records) == sorted(
        (q.id, s) for q in problems for s in ("greedy", "value-beam", "value-beam-centered"))
    assert all(r["tokens"] > 0 for r in records)
    assert all(v is not None for r in records if r["strategy"] != "greedy" for v in r["values"])
    assert all(any(r["values"] for r in records if r["strategy"] == s) for s in ("value-beam", "value-beam-centered"))
    generate(model, tokenizer, problems, heads, {0: 12, 1: 12}, **kwargs)  # resumes: nothing new
    assert len(load_records(out)) == len(records)


def test_weighted_vote_lets_confident_answers_outvote_a_majority():
    from valueprobe.plugin.search import vote

    answers = ["5", "5", "7", ""]
    assert vote(answers, [0.2, 0.2, 0.9, 5.0])[0] == 2  # 0.9 > 0.4; no answer, no vote
    assert vote(answers, [0.5, 0.5, 0.9, 0.0])[0] == 0  # 1.0 > 0.9: the majority holds
    assert vote(answers, [0.3, 0.3, 0.6, 0.0])[0] == 0  # a tie goes to the answer met first
    assert vote(["7", "5", "5"]) == (1, {"7": 1, "5": 2})  # unit weights: the plain majority, and its counts
    assert vote(["9", "4"])[0] == 0  # a tie of counts: the answer met first
    assert vote(["", ""], [1.0, 2.0]) == (0, {})  # no answers at all: the first trace
    # in the report, out of fold, on the planted traces: at least as good as the unweighted vote on mixed problems
    ts = synthetic_trace_set()
    heads, sizes = fit_fold_heads(ts, 5, 3, epochs=30)
    per = from_traces(ts, heads, layer=5, folds=3)
    mixed = [p for p in per["sample"] if 0 < per["sample"][p]["expected"] < 1]
    weighted = np.mean([per["weighted-vote"][p]["correct"] for p in mixed])
    assert weighted >= np.mean([per["self-consistency"][p]["correct"] for p in mixed])
    assert weighted > np.mean([per["sample"][p]["expected"] for p in mixed]) + 0.3
    result, md = report(ts, heads, sizes, [], layer=5, folds=3, width=4, objective="td")
    assert "weighted by V" in md and any(t["a"] == "weighted-vote" for t in result["paired"])
