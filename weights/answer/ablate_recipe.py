"""Issue 31 ablation: the first answer-level recipe (last token, k <= 1% of the width, first stack layout, no
monotone constraint, no free signal served alone; calibration on the split) fitted on the 14 sources, to tell what
the 14 sources do from what the recipe changes do. Run after `bash weights/answer-study/extract.sh`:

    .venv/bin/python weights/answer/ablate_recipe.py   # -> weights/answer/v1-on-14/
"""
from pathlib import Path

from valueprobe.calibration.data import interleave_sources, load_data
from valueprobe.calibration.evaluate import write_report
from valueprobe.calibration.extract import extract_answer_end, load_labels
from valueprobe.calibration.fit import FitConfig, fit_artifact
from valueprobe.plugin import PromptFormat, load_model, save_artifact

SPECS = ["arc-challenge:300", "arc-easy:300", "commonsenseqa:300", "mmlu:600", "sciq:300", "triviaqa:800",
         "nq-open:800", "squad:150", "coqa:120", "drop:100", "arc-open:200", "boolq:300", "winogrande:300",
         "hellaswag:300"]
MODEL = "Qwen2.5-Coder-1.5B-Instruct"
out = Path("weights/answer/v1-on-14/qwen2.5-coder-1.5b-instruct.answer.safetensors")
out.parent.mkdir(parents=True, exist_ok=True)
questions = interleave_sources([load_data(s, seed=0) for s in SPECS])
model, tok = load_model(MODEL)
labels = load_labels(Path("runs/labels/answer-all.1.5b.jsonl"), model_name=MODEL)
_, features = extract_answer_end(model, tok, questions, PromptFormat(), labels=labels, cache_dir="runs/cache/answer31-1.5b")
cfg = FitConfig(layers=[18, 20, 23, 26], heads=("linear",), max_fraction=0.01, random_draws=20, answer_read="last",
                monotone=False, k_criterion="mean", answer_calibration="split", answer_layout="v1",
                answer_free_modes=False, extra={"data_specs": SPECS, "max_new_tokens": 16, "ablation": "v1 recipe"})
artifact, card = fit_artifact(model, tok, features, model_name=MODEL, prompt_format=PromptFormat(), config=cfg,
                              token_position="answer_end")
save_artifact(artifact, out)
write_report(card, out)
print(card["verdict"])
