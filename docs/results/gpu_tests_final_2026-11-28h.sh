# call 6 (nvidia-h200): main after the wavefront's try/finally: the wavefront and CUDA-graph tests, eager kernels.
set -u
export PYTHONUNBUFFERED=1
date -u
timeout 170 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --tb=short -rA -k "(wavefront and not flex) or (cuda_graphs and triton) or unit_storage_is_locked or lookup_options_on_the_gpu_equal_the_plain_cpu_path and fused" > $OUT/tests.txt 2>&1
echo "tests rc $? $(date -u +%T)"; grep -E "^FAILED|^ERROR|^PASSED|passed|failed" $OUT/tests.txt | tail -20
