# call 2 (nvidia-h200-x2; carry [".stage7", ".stage12"]): issue 12 on main after the merges: llama-3-8b 128K on one
# GPU and tensor parallel over two; the torchrun test and the snapshot tests (tokenizer from .stage7/tokck).
set -u
export PYTHONUNBUFFERED=1
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage7/tokck/tokenizer* checkpoints/smollm2-135m-instruct/
B="python scripts/bench.py --shape llama-3-8b --lengths 128K --decode 32 --graphs --json --repeats 2 --kernel triton"
timeout 140 $B | tee -a $OUT/tp.jsonl | cut -c1-400
timeout 180 torchrun --standalone --nproc-per-node 2 scripts/bench.py --shape llama-3-8b --lengths 128K --decode 32 --graphs --json --repeats 2 --kernel triton 2>&1 | grep '^{' | tee -a $OUT/tp.jsonl | cut -c1-400
date -u
timeout 170 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --tb=short -rA -k "two_gpus or snapshot" > $OUT/tests.txt 2>&1; echo "tests rc $?"; grep -E "^FAILED|^ERROR|^PASSED|^SKIPPED|passed|failed" $OUT/tests.txt | tail -8
date -u
