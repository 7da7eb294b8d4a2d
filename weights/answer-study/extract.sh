#!/usr/bin/env bash
# Issue 31: every source read at the answer's end (last token + the answer's tokens pooled); resumable (a rerun
# continues from the cache). Open answers come from the committed labels: nothing is generated.
#   bash weights/answer-study/extract.sh          # Qwen2.5-Coder-1.5B-Instruct -> runs/cache/answer31-1.5b
#   bash weights/answer-study/extract.sh 0.5b     # Qwen2.5-Coder-0.5B-Instruct -> runs/cache/answer31-0.5b
set -euo pipefail
cd "$(dirname "$0")/../.."
size="${1:-1.5b}"
case "$size" in
  1.5b) model=Qwen2.5-Coder-1.5B-Instruct ;;
  0.5b) model=Qwen2.5-Coder-0.5B-Instruct ;;
  *) echo "size must be 1.5b or 0.5b" >&2; exit 2 ;;
esac
mkdir -p runs/labels
cat "weights/labels/qwen2.5-coder-$size-instruct.jsonl" "weights/labels/transfer-open.qwen2.5-coder-$size-instruct.jsonl" \
  > "runs/labels/answer-all.$size.jsonl"
.venv/bin/valueprobe extract --model "$model" --answer-end \
  --data arc-challenge:300 --data arc-easy:300 --data commonsenseqa:300 --data mmlu:600 --data sciq:300 \
  --data triviaqa:800 --data nq-open:800 --data squad:150 --data coqa:120 --data drop:100 --data arc-open:200 \
  --data boolq:300 --data winogrande:300 --data hellaswag:300 \
  --cache "runs/cache/answer31-$size" --labels "runs/labels/answer-all.$size.jsonl" --wave-size 140 --batch-size 8
