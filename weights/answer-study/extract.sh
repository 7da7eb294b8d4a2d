#!/usr/bin/env bash
# Issue 31: every source read at the answer's end (last token + the answer's tokens pooled), Qwen2.5-Coder-1.5B;
# resumable (a rerun continues from the cache). Open answers come from the committed labels: nothing is generated.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs/labels
cat weights/labels/qwen2.5-coder-1.5b-instruct.jsonl weights/labels/transfer-open.qwen2.5-coder-1.5b-instruct.jsonl \
  > runs/labels/answer-all.1.5b.jsonl
.venv/bin/valueprobe extract --model Qwen2.5-Coder-1.5B-Instruct --answer-end \
  --data arc-challenge:300 --data arc-easy:300 --data commonsenseqa:300 --data mmlu:600 --data sciq:300 \
  --data triviaqa:800 --data nq-open:800 --data squad:150 --data coqa:120 --data drop:100 --data arc-open:200 \
  --data boolq:300 --data winogrande:300 --data hellaswag:300 \
  --cache runs/cache/answer31-1.5b --labels runs/labels/answer-all.1.5b.jsonl --wave-size 140 --batch-size 8
