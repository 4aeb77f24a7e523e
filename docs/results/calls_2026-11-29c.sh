# Device calls of 2026-11-29 02:55-03:38 UTC (nvidia-h200 each; the only kind lent), branch storage-moves. carry: .stage17
# (.stage17/base: main 4b6f954 (*.py and scripts/, from git archive); .stage17/tokck: the SmolLM2 tokenizer files. The scripts ran from .stage17 are kept here under the names used below.)
# call 1
set -u
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
P=docs/results/decode_profile_2026-11-28i.py
for code in .stage17/base . .stage17/base . ; do  # main 4b6f954 against this branch, alternating
  tag=$( [ $code = . ] && echo new || echo base )
  CODE=$code timeout 100 python $P --shape mistral-7b --infllm unit_storage=device --top 40 2>&1 | grep -v -i warn >> $OUT/prof_${tag}_1.txt
  CODE=$code timeout 100 python $P --shape mistral-7b --share 2 --tp-path --infllm unit_storage=device --top 40 2>&1 | grep -v -i warn >> $OUT/prof_${tag}_tp2.txt
  date -u
done
grep -H '^{' $OUT/prof_*.txt | cut -c1-330; grep -H "_gather_kernel\|_scatter_kernel" $OUT/prof_*.txt
date -u
# call 2
set -u
date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage17/tokck/* checkpoints/smollm2-135m-instruct/
timeout 300 python -X faulthandler -m pytest -v tests/test_gpu.py -k "do_not_fit or units_moved or units_stored or lookup_options" -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
grep -n "PASS\|FAIL\|ERROR\|Fatal\|passed\|failed" $OUT/gpu_tests.txt | head -30
date -u
B="scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for code in . .stage17/base; do
  (cd $code && timeout 90 python $B --shape mistral-7b 2>/dev/null | sed "s|^{|{\"code\": \"$code\", |" >> $OUT/bench.jsonl)
done
cut -c1-400 $OUT/bench.jsonl
date -u
# call 3
set -u
date -u
python docs/results/gemv_2026-11-29c.py 2>&1 | tee $OUT/gemv.jsonl | cut -c1-300
date -u
# (first_prompt_2026-11-29c.sh: the 2026-11-29b script with .stage16 read as .stage17, kept under that name)
bash docs/results/first_prompt_2026-11-29c.sh 2>&1 | tail -12
date -u
B="scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for code in .stage17/base . ; do
  (cd $code && timeout 90 python $B --shape llama-3-8b 2>/dev/null | sed "s|^{|{\"code\": \"$code\", |" >> $OUT/bench.jsonl)
done
cut -c1-330 $OUT/bench.jsonl
date -u
# call 4
set -u
date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage17/tokck/* checkpoints/smollm2-135m-instruct/
timeout 530 python -X faulthandler -m pytest -v tests/test_gpu.py -p no:cacheprovider -k "host_copies or gather_from_host or snapshot_on_the_gpu or greedy_decoding or fast_path_equals or fp8_units or storage_is_locked or wavefront or compiles_no_triton or pinned_storage or lru_kernel or select_kernel" > $OUT/gpu_tests_a.txt 2>&1
grep -n "PASS\|FAIL\|ERROR\|Fatal\|passed\|failed" $OUT/gpu_tests_a.txt | cut -c1-160 | head -40
grep -n -A25 "^___" $OUT/gpu_tests_a.txt | head -60
date -u
# call 5
set -u
date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage17/tokck/* checkpoints/smollm2-135m-instruct/
timeout 480 python -X faulthandler -m pytest -v tests/test_gpu.py -p no:cacheprovider -k "not (host_copies or gather_from_host or snapshot_on_the_gpu or greedy_decoding or fast_path_equals or fp8_units or storage_is_locked or wavefront or compiles_no_triton or pinned_storage or lru_kernel or select_kernel or do_not_fit or units_moved or units_stored or lookup_options)" > $OUT/gpu_tests_b.txt 2>&1
grep -c PASSED $OUT/gpu_tests_b.txt; grep -n "FAIL\|ERROR\|Fatal\|passed\|failed\|SKIP" $OUT/gpu_tests_b.txt | cut -c1-160 | head -20
tail -3 $OUT/gpu_tests_b.txt | cut -c1-200
date -u
# call 6
set -u
date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage17/tokck/* checkpoints/smollm2-135m-instruct/
timeout 270 python -X faulthandler -m pytest -v tests/test_gpu.py -p no:cacheprovider -k "units_ or do_not_fit or storage_is_locked or fp8_units or snapshot_on_the_gpu or ring_lookup" > $OUT/gpu_tests_c.txt 2>&1
grep -n "PASS\|FAIL\|ERROR\|Fatal\|passed\|failed" $OUT/gpu_tests_c.txt | cut -c1-160 | head -30
grep -n -A25 "^___" $OUT/gpu_tests_c.txt | head -40
date -u
