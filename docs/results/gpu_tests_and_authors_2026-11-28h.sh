# call 3 of 2026-11-28 night (nvidia-h200; carry [".stage7", ".stage13"]), branch layered-wave: the authors' InfLLM on
# mistral-7b 128K (same card, same session as call 2); the GPU tests.
set -u
export PYTHONUNBUFFERED=1
date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage7/tokck/tokenizer* checkpoints/smollm2-135m-instruct/
bash .stage7/authors/run.sh > $OUT/authors.txt 2>&1; echo "authors rc $? $(date -u +%T)"
grep -v "^\s*$" $OUT/authors.txt | tail -3 | cut -c1-1200
timeout 240 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --tb=short -rA -k "not compiled and not flex and not two_gpus" > $OUT/tests.txt 2>&1
echo "tests rc $? $(date -u +%T)"; grep -E "^FAILED|^ERROR|passed|failed" $OUT/tests.txt | tail -12
timeout 170 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --tb=short -rA -k "(cuda_graphs or wavefront) and (compiled or flex)" > $OUT/tests_compiled.txt 2>&1
echo "compiled tests rc $? $(date -u +%T)"; grep -E "^FAILED|^ERROR|^PASSED|passed|failed" $OUT/tests_compiled.txt | tail -14
date -u
