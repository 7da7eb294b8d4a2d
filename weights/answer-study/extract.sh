#!/usr/bin/env bash
# Issue 31: every source read at the answer's end (last token + pooled answer tokens), 1.5B; resumable.
set -x
cd /work/main
.venv/bin/valueprobe extract --model Qwen2.5-Coder-1.5B-Instruct --answer-end \
  --data arc-challenge:300 --data arc-easy:300 --data commonsenseqa:300 --data mmlu:600 --data sciq:300 \
  --data triviaqa:800 --data nq-open:800 --data squad:150 --data coqa:120 --data drop:100 --data arc-open:200 \
  --data boolq:300 --data winogrande:300 --data hellaswag:300 \
  --cache runs/cache/answer31-1.5b --labels runs/labels/answer-all.1.5b.jsonl --wave-size 140 --batch-size 8
echo QUEUE DONE
