# call 1 of 2026-11-28 night (nvidia-h200; carry [".stage13"]): layered-wave (this tree) against main; grouped-column-sums
set -u
export PYTHONUNBUFFERED=1
date -u
timeout 200 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --tb=short -rA -k "triton_attention_equals_plain or column_sums_kernel_equals_plain or (wavefront and not flex) or (cuda_graphs and (triton or fused)) or unit_storage_is_locked or ring_lookup" > $OUT/tests.txt 2>&1
echo "tests rc $? $(date -u +%T)"; grep -E "^FAILED|^ERROR|passed|failed" $OUT/tests.txt | tail -12
B="python scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for tree in . .stage13/main . .stage13/main; do
  (cd $tree && timeout 100 $B --shape mistral-7b | sed "s|^|$tree: |") | tee -a $OUT/bench.jsonl | cut -c1-400
done
for tree in . .stage13/main; do
  (cd $tree && timeout 60 $B --shape smollm2-135m | sed "s|^|$tree: |") | tee -a $OUT/bench.jsonl | cut -c1-400
done
date -u
(cd .stage13/gcs && timeout 100 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --tb=short -rA -k "column_sums_kernel_equals_plain or (cuda_graphs and triton and infllm)" > $OUT/tests_gcs.txt 2>&1; echo "gcs tests rc $?"); grep -E "^FAILED|^ERROR|passed|failed" $OUT/tests_gcs.txt | tail -6
(cd .stage13/gcs && timeout 100 $B --shape mistral-7b | sed "s|^|gcs: |") | tee -a $OUT/bench.jsonl | cut -c1-400
date -u
timeout 150 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --tb=short -rA -k "wavefront and flex" > $OUT/tests_flex.txt 2>&1; echo "flex tests rc $?"; grep -E "^FAILED|^ERROR|passed|failed" $OUT/tests_flex.txt | tail -6
date -u
