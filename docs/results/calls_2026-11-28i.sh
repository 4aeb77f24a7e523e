nvidia-smi --query-gpu=name --format=csv,noheader
date -u
(cd <a copy of main fd5b4dc> && echo "== main" && python docs/results/lookup_kernels_2026-11-28i.py 2>&1 | grep -v -i warn) | tee $OUT/micro2.txt
(echo "== branch" && python docs/results/lookup_kernels_2026-11-28i.py 2>&1 | grep -v -i warn) | tee -a $OUT/micro2.txt
timeout 420 python -m pytest -q tests/test_gpu.py -k "not flex and not compiled" 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
# call 4
date -u
B="scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for i in 1 2; do
  (cd <a copy of main fd5b4dc> && python $B --shape mistral-7b 2>/dev/null | sed 's/^{/{"code": "main fd5b4dc", /') >> $OUT/bench.jsonl
  python $B --shape mistral-7b 2>/dev/null | sed 's/^{/{"code": "decode-ahead 5afd56b", /' >> $OUT/bench.jsonl
done
(cd <a copy of main fd5b4dc> && python $B --shape smollm2-135m 2>/dev/null | sed 's/^{/{"code": "main fd5b4dc", /') >> $OUT/bench.jsonl
python $B --shape smollm2-135m 2>/dev/null | sed 's/^{/{"code": "decode-ahead 5afd56b", /' >> $OUT/bench.jsonl
cut -c1-400 $OUT/bench.jsonl
CODE=<a copy of main fd5b4dc> python docs/results/decode_profile_2026-11-28i.py --shape mistral-7b --share 2 --tp-path --top 40 2>&1 | grep -v -i warn > $OUT/prof_main_tp2.txt
python docs/results/decode_profile_2026-11-28i.py --shape mistral-7b --share 2 --tp-path --top 40 2>&1 | grep -v -i warn > $OUT/prof_branch_tp2.txt
grep -h '^{' $OUT/prof_*.txt
date -u
# call 5
for sh in "2 --tp-path" "1"; do python docs/results/decode_gap_2026-11-28i.py --shape mistral-7b --share $sh; done
# call 1 (before the branch: main fd5b4dc)
for s in "mistral-7b" "mistral-7b max_cached_block=1100" "smollm2-135m"; do set -- $s; python docs/results/decode_gap_2026-11-28i.py --shape $1 --infllm "${2:-}"; done
# call 6 (branch 5afd56b)
python docs/results/gather_tiles_2026-11-28i.py
B="scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K --shape mistral-7b"
for sp in 4 16 8; do python docs/results/with_gather_split_2026-11-28i.py $sp $B; done
# call 7 (52d160b)
timeout 330 python -m pytest -q tests/test_gpu.py -k "ahead or select or unit_scores or wavefront_on_streams or ring_lookup or lookup_options"
