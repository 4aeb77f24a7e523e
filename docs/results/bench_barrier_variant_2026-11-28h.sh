# call 5 (nvidia-h200; carry [".stage13"]): where the gain comes from: the branch with a barrier between steps put back
# (.stage13/barrier: only the fill and drain steps run fewer layers) against the branch, mistral-7b and SmolLM2 128K.
set -u
export PYTHONUNBUFFERED=1
date -u
B="python scripts/bench.py --graphs --json --decode 8 --kernel triton --repeats 2 --lengths 128K"
for tree in .stage13/barrier . ; do
  (cd $tree && timeout 80 $B --shape mistral-7b | sed "s|^|$tree: |") | tee -a $OUT/bench.jsonl | cut -c1-250
done
for tree in .stage13/barrier . ; do
  (cd $tree && timeout 50 $B --shape smollm2-135m | sed "s|^|$tree: |") | tee -a $OUT/bench.jsonl | cut -c1-250
done
date -u
