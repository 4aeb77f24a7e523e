# Device calls of 2026-11-29 01:36-02:10 UTC (nvidia-h200 each; the only kind lent), branch device-units. carry: .stage16
# (the SmolLM2 tokenizer files in .stage16/tokck). Calls 1-2 before unit_storage=auto existed (the default was host).
# call 1
set -u
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage16/tokck/* checkpoints/smollm2-135m-instruct/
timeout 240 python -m pytest -q -x tests/test_gpu.py -k "units_stored or do_not_fit or fp8_units or snapshot_on_the_gpu or fast_path_equals" -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
date -u
B="scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for i in 1 2; do
  for s in host device; do
    timeout 90 python $B --shape mistral-7b --infllm unit_storage=$s 2>/dev/null | sed "s/^{/{\"storage\": \"$s\", /" >> $OUT/bench.jsonl
  done
done
cut -c1-400 $OUT/bench.jsonl
date -u
P=docs/results/decode_profile_2026-11-28i.py
for s in host device; do
  CODE=. timeout 100 python $P --shape mistral-7b --share 2 --tp-path --infllm unit_storage=$s --top 40 2>&1 | grep -v -i warn > $OUT/prof_${s}_tp2.txt
done
CODE=. timeout 100 python $P --shape mistral-7b --infllm unit_storage=device --top 40 2>&1 | grep -v -i warn > $OUT/prof_device_1.txt
grep -h '^{' $OUT/prof_*.txt
head -25 $OUT/prof_device_tp2.txt
date -u
# call 2
set -u
date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage16/tokck/* checkpoints/smollm2-135m-instruct/
timeout 200 python -X faulthandler -m pytest -v -x tests/test_gpu.py -k "units_stored or do_not_fit" -p no:cacheprovider > $OUT/gpu_tests_new.txt 2>&1
grep -n "PASS\|FAIL\|ERROR\|Fatal\|passed\|failed" $OUT/gpu_tests_new.txt | head -30
grep -n -B2 -A12 "Fatal Python" $OUT/gpu_tests_new.txt | head -60
date -u
B="scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
for s in host device; do
  timeout 120 python $B --shape llama-3-8b --infllm unit_storage=$s 2>/dev/null | sed "s/^{/{\"storage\": \"$s\", /" >> $OUT/bench_llama.jsonl
done
cut -c1-400 $OUT/bench_llama.jsonl
date -u
P=docs/results/decode_profile_2026-11-28i.py
for s in host device; do
  CODE=. timeout 100 python $P --shape llama-3-8b --share 2 --tp-path --infllm unit_storage=$s --top 40 2>&1 | grep -v -i warn > $OUT/prof_llama_${s}_tp2.txt
done
grep -h '^{' $OUT/prof_*.txt
date -u
# call 3
set -u
date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage16/tokck/* checkpoints/smollm2-135m-instruct/
timeout 300 python -m pytest -q tests/test_gpu.py -k "units_stored or units_moved or do_not_fit or fp8_units or snapshot_on_the_gpu or fast_path_equals or cuda_graphs_replay or compiles_no_triton or greedy or storage_is_locked" -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
tail -5 $OUT/gpu_tests.txt; grep -n "^FAILED\|Fatal\|^E " $OUT/gpu_tests.txt | head -20
date -u
bash docs/results/first_prompt_2026-11-29b.sh
B="scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K"
timeout 90 python $B --shape mistral-7b 2>/dev/null | sed "s/^{/{\"storage\": \"auto\", /" >> $OUT/bench.jsonl
timeout 110 python scripts/bench.py --graphs --json --decode 32 --kernel triton --repeats 2 --lengths 960K --shape smollm2-135m 2>/dev/null | sed "s/^{/{\"storage\": \"auto\", /" >> $OUT/bench.jsonl
cut -c1-420 $OUT/bench.jsonl
date -u
# call 4
set -u
date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage16/tokck/* checkpoints/smollm2-135m-instruct/
timeout 420 python -X faulthandler -m pytest -q tests/test_gpu.py -k "units_ or do_not_fit or fp8_units or snapshot_on_the_gpu or fast_path_equals or cuda_graphs_replay or compiles_no_triton or greedy or storage_is_locked or wavefront_on_streams or ordered_memory or lookup_options or bf16_fast" -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
tail -5 $OUT/gpu_tests.txt; grep -n "^FAILED\|Fatal\|^E " $OUT/gpu_tests.txt | head -20
date -u
timeout 100 python scripts/bench.py --graphs --json --decode 64 --kernel triton --repeats 2 --lengths 128K --shape llama-3-8b 2>/dev/null | sed "s/^{/{\"storage\": \"auto\", /" >> $OUT/bench.jsonl
cut -c1-420 $OUT/bench.jsonl
date -u
# call 5
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage16/tokck/* checkpoints/smollm2-135m-instruct/; timeout 150 python -m pytest -q tests/test_gpu.py -k "units_moved" -p no:cacheprovider --tb=short 2>&1 | grep -v "warn\|Warn" | head -60
# call 6
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage16/tokck/* checkpoints/smollm2-135m-instruct/; date -u; timeout 230 python -m pytest -q tests/test_gpu.py -k "units_ or do_not_fit or storage_is_locked or ordered_memory or lookup_options" -p no:cacheprovider --tb=short 2>&1 | grep -v "warn\|Warn" | tail -30; date -u
