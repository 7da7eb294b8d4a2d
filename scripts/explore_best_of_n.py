"""The exploration that chose the centred readout (GroupCenteredProbe) for bench search: on the traced problems,
out of fold (the bench's 5 folds), best-of-4 accuracy and within-problem AUROC of three readouts of the last state
(the TD MLP head, a logistic on raw states, the group-centred logistic) at layers 16, 20 and 23.
Run: .venv/bin/python scripts/explore_best_of_n.py (about a minute; prints one line per layer)."""
import numpy as np
from pathlib import Path
from collections import Counter
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from valueprobe.calibration.trajectories import load_traces, trace_states
from valueprobe.bench.search import fold_of
from valueprobe.calibration.dopamine import fit_value_head

tr = load_traces(Path("weights/traces/qwen2.5-coder-1.5b-instruct.gsm8k.jsonl"))
ts = trace_states(None, None, tr, states_dir=Path("runs/traces"), progress=False)
by = {}
for i, t in enumerate(ts.traces):
    by.setdefault(t["problem"], []).append(i)
probs = sorted(by)
y = np.array([t["label"] for t in ts.traces])
fold = {p: fold_of(p, 5) for p in probs}
for layer in (16, 20, 23):
    S = ts.layer(layer)
    last = np.stack([s[-1] for s in S])
    res = {k: [] for k in ("td", "bce_last", "centered", "sc", "oracle", "sample")}
    pair = {k: [] for k in ("td", "bce_last", "centered")}
    for f in range(5):
        train_p = [p for p in probs if fold[p] != f]; test_p = [p for p in probs if fold[p] == f]
        tri = [i for p in train_p for i in by[p]]
        td = fit_value_head([S[i] for i in tri], y[tri], objective="td", epochs=40, seed=0)
        mu, sd = last[tri].mean(0), last[tri].std(0) + 1e-6
        lr = LogisticRegression(C=0.01, max_iter=2000).fit((last[tri] - mu) / sd, y[tri])
        # centered within problem, trained on mixed problems only
        Xc, yc = [], []
        for p in train_p:
            idx = by[p]
            if 0 < y[idx].mean() < 1:
                Xc.append((last[idx] - last[idx].mean(0)) / sd); yc.append(y[idx])
        cen = LogisticRegression(C=0.01, max_iter=2000).fit(np.concatenate(Xc), np.concatenate(yc))
        for p in test_p:
            idx = by[p]
            scores = {"td": td.predict_proba(last[idx]), "bce_last": lr.decision_function((last[idx] - mu) / sd),
                      "centered": cen.decision_function((last[idx] - last[idx].mean(0)) / sd)}
            for k, v in scores.items():
                res[k].append(y[idx][int(np.argmax(v))])
                if 0 < y[idx].mean() < 1:
                    pair[k].append(roc_auc_score(y[idx], v))
            preds = [ts.traces[i]["prediction"] for i in idx]
            w = Counter(x for x in preds if x).most_common(1)
            res["sc"].append(y[idx][preds.index(w[0][0])] if w else y[idx][0])
            res["oracle"].append(y[idx].max()); res["sample"].append(y[idx].mean())
    print(layer, len(probs), {k: round(float(np.mean(v)), 3) for k, v in res.items()},
          "within-problem AUROC", {k: round(float(np.mean(v)), 3) for k, v in pair.items()}, "mixed", len(pair["td"]), flush=True)
