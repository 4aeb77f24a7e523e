# Device calls of 2026-11-29 00:27-00:57 UTC (nvidia-h200 each; the only kind lent). carry: .stage15 (a copy of main
# 5987e3b in .stage15/main, of fd5b4dc in .stage15/fd5, the SmolLM2 tokenizer files in .stage15/tokck).
# call 1 (branch, first version)
set -u
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
M=.stage15/main
(cd $M && echo "== main" && python docs/results/decode_attention_2026-11-29.py 2>&1 | grep -v -i warn) | tee $OUT/micro.txt
(echo "== branch" && python docs/results/decode_attention_2026-11-29.py 2>&1 | grep -v -i warn) | tee -a $OUT/micro.txt
date -u
timeout 240 python -m pytest -q -x tests/test_gpu.py -k "triton_attention or rotations or column_sums or ahead" 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
date -u
P=docs/results/decode_profile_2026-11-28i.py
CODE=$M timeout 100 python $P --shape mistral-7b --share 2 --tp-path --top 40 2>&1 | grep -v -i warn > $OUT/prof_main_tp2.txt
timeout 100 python $P --shape mistral-7b --share 2 --tp-path --top 40 2>&1 | grep -v -i warn > $OUT/prof_branch_tp2.txt
grep -h '^{' $OUT/prof_*.txt
head -30 $OUT/prof_branch_tp2.txt
date -u
# call 2 (branch, first version)
set -u
date -u
M=.stage15/main
P=docs/results/decode_profile_2026-11-28i.py
CODE=. timeout 100 python $P --shape mistral-7b --share 2 --tp-path --top 40 2>&1 | grep -v -i warn > $OUT/prof_branch_tp2.txt
grep -h '^{' $OUT/prof_*.txt
B="scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for i in 1 2; do
  (cd $M && timeout 120 python $B --shape mistral-7b 2>/dev/null | sed 's/^{/{"code": "main 5987e3b", /') >> $OUT/bench.jsonl
  timeout 120 python $B --shape mistral-7b 2>/dev/null | sed 's/^{/{"code": "decode-columns", /' >> $OUT/bench.jsonl
done
(cd $M && timeout 60 python $B --shape smollm2-135m 2>/dev/null | sed 's/^{/{"code": "main 5987e3b", /') >> $OUT/bench.jsonl
timeout 60 python $B --shape smollm2-135m 2>/dev/null | sed 's/^{/{"code": "decode-columns", /' >> $OUT/bench.jsonl
cut -c1-420 $OUT/bench.jsonl
date -u
# call 3 (branch, first version)
date -u
timeout 300 python docs/results/decode_attention_tiles_2026-11-29.py 2>&1 | grep -v -i warn | tee $OUT/tiles.txt
date -u
# call 4 (branch e6740c1)
set -u
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 170 python -m pytest -q -x tests/test_gpu.py -k "triton_attention or ahead" 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
date -u
M=.stage15/main
B="scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for i in 1 2; do
  (cd $M && timeout 75 python $B --shape mistral-7b 2>/dev/null | sed 's/^{/{"code": "main 5987e3b", /') >> $OUT/bench.jsonl
  timeout 75 python $B --shape mistral-7b 2>/dev/null | sed 's/^{/{"code": "decode-columns", /' >> $OUT/bench.jsonl
done
cut -c1-330 $OUT/bench.jsonl
CODE=. timeout 80 python docs/results/decode_profile_2026-11-28i.py --shape mistral-7b --share 2 --tp-path --top 40 2>&1 | grep -v -i warn > $OUT/prof_branch_tp2.txt
head -1 $OUT/prof_branch_tp2.txt
date -u
bash docs/results/first_prompt_2026-11-29.sh
# call 5 (branch e6740c1)
set -u
date -u
B="scripts/bench.py --graphs --json --decode 32 --kernel triton --repeats 2 --lengths 960K --shape smollm2-135m"
for t in fd5 main .; do
  d=.stage15/$t; [ $t = . ] && d=.
  (cd $d && INFLLM_COMPILE_CACHE=$HOME/cc_$t timeout 110 python $B 2>&1 | grep '^{' | sed "s/^{/{\"code\": \"$t\", /") | tee -a $OUT/bench960.jsonl | cut -c1-420
  date -u
done
# call 6 (branch e6740c1)
timeout 200 python -m pytest -q tests/test_gpu.py -k "compiles_no_triton or wavefront_on_streams or fast_path or snapshot_on_the_gpu or greedy" -p no:cacheprovider | tail -6
