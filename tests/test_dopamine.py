"""Value over steps and dopamine neurons on synthetic traces with a planted value neuron and a planted TD-error
neuron: the TD and final-reward heads both find the value, the dopamine ranking finds the planted neuron and
beats random neurons on held-out problems."""

import numpy as np

from valueprobe.calibration.dopamine import dopamine_neurons, fit_values, split_problems


def planted_traces(n_problems=60, per_problem=4, width=40, seed=0):
    rng = np.random.default_rng(seed)
    states, rewards, problems = [], [], []
    for p in range(n_problems):
        difficulty = rng.uniform(-1, 1)
        for _ in range(per_problem):
            steps = int(rng.integers(3, 7))
            logit = np.cumsum(rng.normal(difficulty, 1.0, steps + 1))
            v = 1 / (1 + np.exp(-logit))
            reward = int(rng.random() < v[-1])
            x = rng.normal(0, 1, (steps + 1, width))
            x[:, 3] = 4 * logit                                   # value neuron
            x[1:, 7] = 20 * np.diff(v) + 0.05 * rng.normal(size=steps)  # fires on the change in value
            states.append(x)
            rewards.append(reward)
            problems.append(f"p{p}")
    return states, np.array(rewards), problems


def test_problem_split_is_stable_and_by_problem():
    a = split_problems(["p1", "p2", "p1", "p3"] * 10)
    assert a[0] == a[2] and 0 < a.mean() < 1
    assert (split_problems([f"p{i}" for i in range(1000)]).mean() - 0.3) < 0.05


def test_value_heads_and_dopamine_neurons_find_the_planted_signals():
    states, rewards, problems = planted_traces()
    test = split_problems(problems)
    values = fit_values(states, rewards, test, epochs=30)
    for objective in ("bce", "td"):
        res = values["by_objective"][objective]
        assert res["auroc_by_step"]["last"]["auroc"] > 0.8, objective
        assert 0 <= res["ece"] <= 1
    dop = dopamine_neurons(states, test, values["heads"]["td"], k=2, random_draws=50, value_neurons=[3, 5])
    assert 7 in dop["neurons"]
    assert dop["heldout_spearman"] > 0.5 and dop["heldout_spearman"] > dop["random_mean"] + 3 * dop["random_sd"]
    assert dop["percentile_vs_random"] >= 85  # random pairs that happen to include neuron 7 or 3 can match it
    assert set(dop["overlap_with_value_neurons"]) <= {3}


def test_report_writes_tables_and_the_surprise_plot(tmp_path):
    import torch

    from valueprobe.calibration.dopamine import report
    from valueprobe.calibration.trajectories import TraceSet

    states, rewards, problems = planted_traces(n_problems=40)
    traces = [{"id": f"{p}#{i}", "problem": p, "label": int(r)} for i, (p, r) in enumerate(zip(problems, rewards))]
    # two recorded "layers": noise only, and the planted one
    rng = np.random.default_rng(1)
    ts = TraceSet(traces, [torch.tensor(np.stack([rng.normal(size=s.shape), s], axis=1), dtype=torch.float16)
                           for s in states], [4, 9])
    result, md = report(ts, value_neurons=[3], value_layer=9, k=2, random_draws=20, epochs=20,
                        plot_path=tmp_path / "surprise.png")
    assert result["layer"] == 9 and "| TD |" in md and "Dopamine neurons" in md
    assert (tmp_path / "surprise.png").stat().st_size > 10_000
