# Ran on nvidia-h100-x1 (NVIDIA H100 80GB HBM3), 2026-12-08 00:13-00:18 UTC, as one call on one card; outputs: issue33_*_2026-12-08_h100.*
# Issue 33, one device call: the code before the issue (.stage33/base: 36a1d46, from git archive)
# and after it (this checkout), in one call on one card. Random weights throughout (the real SmolLM2 checkpoint
# takes two calls to carry, and this session's device time allowed one).
#  1. mistral-7b 128K steady prefill and decode (bench.py, eager GPU path: Triton kernels, CUDA graphs,
#     unit_storage=auto), --repeats 2 each, before then after.
#  2. --engine reference against --engine fast on a 32K passkey prompt, SmolLM2 shape, bf16: the same greedy tokens.
#  3. SmolLM2-shape 128K passkey prompt, fresh processes of generate.py, before and after, cold (empty compile cache)
#     then warm.
#  4. The GPU tests of the engine's Triton kernels against their specs, the CUDA graphs and decode_ahead.
# carry: .stage33 (base/, tokck/: the SmolLM2 tokenizer files).
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
B="scripts/bench.py --graphs --json --decode 32 --kernel triton --repeats 2 --lengths 128K --shape mistral-7b"
for code in .stage33/base . ; do
  tag=$( [ $code = . ] && echo after || echo before )
  (cd $code && timeout 100 python $B 2>$HOME/err_$tag.txt | sed "s|^{|{\"code\": \"$tag\", |" >> $OUT/bench.jsonl)
  grep -i "error" $HOME/err_$tag.txt | tail -3
done
cut -c1-330 $OUT/bench.jsonl; date -u
CK=$HOME/ck; mkdir -p $CK && cp .stage33/tokck/* $CK/
python - <<PY
import sys; sys.path[:0] = ['.', 'scripts']
import torch
from safetensors.torch import save_file
from model import random_model, checkpoint_state
from bench import SHAPES
m = random_model(SHAPES['smollm2-135m'], dtype=torch.bfloat16)
save_file({'model.' + k: v.contiguous() for k, v in checkpoint_state(m).items() if k != 'lm_head.weight'}, '$CK/model.safetensors')
from passkey import prompt_text, layout
from tokenizer import load_tokenizer
tok = load_tokenizer('$CK')
for name, L in (('32k', 32 * 1024), ('128k', 128 * 1024)):
    open('$HOME/%s.txt' % name, 'w').write(prompt_text(*layout(tok, L, 0.5, 72413), 72413))
print('ready')
PY
for e in reference fast; do
  timeout 80 python generate.py --ckpt $CK --prompt-file $HOME/32k.txt --engine $e --max-new-tokens 16 --json --no-progress \
    2>$HOME/e.txt | sed "s|^{|{\"engine\": \"$e\", |" | tee -a $OUT/engines.jsonl | cut -c1-250
  grep -i error $HOME/e.txt
done
date -u
for code in .stage33/base . ; do
  tag=$( [ $code = . ] && echo after || echo before )
  export INFLLM_COMPILE_CACHE=$HOME/cc_$tag; rm -rf $INFLLM_COMPILE_CACHE
  for i in cold warm; do
    t0=$EPOCHREALTIME
    (cd $code && timeout 70 python generate.py --ckpt $CK --max-new-tokens 16 --no-progress --json --prompt-file $HOME/128k.txt > $HOME/g.out 2>&1)
    t1=$EPOCHREALTIME
    echo "{\"code\": \"$tag\", \"run\": \"smollm2-128k-$i\", \"wall_s\": $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}"), \"json\": $(grep '^{' $HOME/g.out | tail -1 || echo null)}" | tee -a $OUT/first.jsonl | cut -c1-300
    grep -i error $HOME/g.out
  done
done
date -u
mkdir -p checkpoints/smollm2-135m-instruct && cp .stage33/tokck/* checkpoints/smollm2-135m-instruct/
timeout 90 python -m pytest -q -rf tests/test_gpu.py -p no:cacheprovider -k "bookkeeping_kernels or (fast_path_equals and triton) or (cuda_graphs and triton) or greedy_decoding_ahead" > $OUT/gpu_tests.txt 2>&1
grep -n "FAIL\|Error\|passed\|failed" $OUT/gpu_tests.txt | cut -c1-200 | head -20
date -u
