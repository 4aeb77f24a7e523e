# call 5 (nvidia-h200, carry [".stage7", ".stage11"]): fresh processes on main after the merges (fused-projections,
# faster-attention): SmolLM2 128K generate.py cold, warm, warm; mistral-7b 128K bench.py --repeats 1 cold, warm.
set -u
export PYTHONUNBUFFERED=1
date -u
# Fresh processes, the branch only: cold (empty cache) then warm.
CK=$HOME/ck; mkdir -p $CK && cp .stage7/tokck/* $CK/
python - <<PY
import sys; sys.path.insert(0, '.'); sys.path.insert(0, 'scripts')
import torch
from safetensors.torch import save_file
from model import random_model, checkpoint_state
from bench import SHAPES
m = random_model(SHAPES['smollm2-135m'], dtype=torch.bfloat16)
save_file({'model.' + k: v.contiguous() for k, v in checkpoint_state(m).items() if k != 'lm_head.weight'}, '$CK/model.safetensors')
from passkey import prompt_text, layout
from tokenizer import load_tokenizer
tok = load_tokenizer('$CK')
open('$HOME/128k.txt', 'w').write(prompt_text(*layout(tok, 128 * 1024, 0.5, 72413), 72413))
PY
rm -rf $HOME/cc
for run in cold warm warm; do
  t0=$EPOCHREALTIME
  INFLLM_COMPILE_CACHE=$HOME/cc timeout 90 python generate.py --ckpt $CK --max-new-tokens 64 --no-progress --json --prompt-file $HOME/128k.txt > $HOME/g.out 2>&1
  t1=$EPOCHREALTIME
  echo "{\"run\": \"smollm2-128k-$run\", \"wall_s\": $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}"), \"json\": $(grep '^{' $HOME/g.out | tail -1 || echo null)}" | tee -a $OUT/first.jsonl | cut -c1-300
done
rm -rf $HOME/ccM
for run in cold warm; do
  t0=$EPOCHREALTIME
  INFLLM_COMPILE_CACHE=$HOME/ccM timeout 120 python scripts/bench.py --shape mistral-7b --lengths 128K --decode 32 --repeats 1 --kernel triton --graphs --json > $HOME/b.out 2>&1
  t1=$EPOCHREALTIME
  echo "{\"run\": \"mistral128k-$run\", \"wall_s\": $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}"), \"json\": $(grep '^{' $HOME/b.out | tail -1 || echo null)}" | tee -a $OUT/first.jsonl | cut -c1-300
done
date -u
