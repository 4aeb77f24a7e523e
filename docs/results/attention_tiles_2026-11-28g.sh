# call 1 of 2026-11-28 evening (nvidia-h200; carry [".stage8", ".stage11", ".stage12"]): the attention without its skip branch
set -u
export PYTHONUNBUFFERED=1
date -u
timeout 200 python docs/results/attention_tiles_2026-11-28g.py > $OUT/tune.txt 2>&1; echo "tune rc $?"; grep -v "^  .*failed" $OUT/tune.txt | tail -32
BEST=$(grep '^BEST ' $OUT/tune.txt | cut -d' ' -f2-); FEW=$(grep '^BEST_FEW ' $OUT/tune.txt | cut -d' ' -f2-)
rm -rf /tmp/best && mkdir /tmp/best && cp -r *.py scripts tests .stage11 /tmp/best/
python - "$BEST" "$FEW" <<'PY'
import sys, re
s = open('/tmp/best/kernels.py').read()
s = re.sub(r'^TWO_PART_CONFIG = dict\(.*$', 'TWO_PART_CONFIG = ' + sys.argv[1], s, flags=re.M)
s = re.sub(r'^TWO_PART_CONFIG_FEW = dict\(.*$', 'TWO_PART_CONFIG_FEW = ' + sys.argv[2], s, flags=re.M)
open('/tmp/best/kernels.py', 'w').write(s)
PY
grep -n "^TWO_PART_CONFIG" /tmp/best/kernels.py
B="python scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for tree in /tmp/best . /tmp/best .; do
  (cd $tree && timeout 100 $B --shape mistral-7b | sed "s|^|$tree: |") | tee -a $OUT/bench.jsonl | cut -c1-330
done
for tree in /tmp/best .; do
  (cd $tree && timeout 60 $B --shape smollm2-135m | sed "s|^|$tree: |") | tee -a $OUT/bench.jsonl | cut -c1-330
done
date -u
(cd /tmp/best && timeout 130 python -m pytest -q tests/test_gpu.py -p no:cacheprovider --tb=short -rA -k "(fast_path and (triton or fused)) or (cuda_graphs and triton) or (wavefront_on_streams and not flex) or snapshot" > $OUT/tests.txt 2>&1; echo "tests rc $?"); grep -E "^FAILED|^ERROR|^PASSED|passed|failed" $OUT/tests.txt | tail -14
date -u
