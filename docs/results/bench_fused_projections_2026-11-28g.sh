# Next session, call 1 (nvidia-h200, ~7 min; carry [".stage8", ".stage11"]): branch fused-projections against main.
# Prepare: rm -rf .stage11/main && mkdir .stage11/main && git archive main | tar -x -C .stage11/main; git checkout fused-projections
# Merge only if the tests pass and decoding measures faster with prefill no slower (A/B in this one call).
set -u
export PYTHONUNBUFFERED=1
date -u
timeout 200 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --tb=short -rA -k "residual_norm or fast_path or (cuda_graphs and triton) or kernels_equal_pytorchs or (wavefront_on_streams and not flex) or fp8" > $OUT/tests.txt 2>&1
echo "tests rc $? $(date -u +%T)"; grep -E "^FAILED|^ERROR|passed|failed" $OUT/tests.txt | tail -10
B="python scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for tree in . .stage11/main . .stage11/main; do
  (cd $tree && timeout 100 $B --shape mistral-7b | sed "s|^|$tree: |") | tee -a $OUT/bench.jsonl | cut -c1-300
done
for tree in . .stage11/main; do
  (cd $tree && timeout 60 $B --shape smollm2-135m | sed "s|^|$tree: |") | tee -a $OUT/bench.jsonl | cut -c1-300
done
S=$PWD/.stage11/steps.py
for tree in . .stage11/main; do
  (cd $tree && timeout 50 python $S mistral-7b 65536 2>&1 | grep -v Warn | head -2 | sed "s|^|$tree: |") | tee -a $OUT/steps.txt
done
timeout 100 python .stage8/prof.py mistral-7b 131072 > $OUT/prof.txt 2>&1; grep -E "prefill run|graph|==" $OUT/prof.txt
date -u
