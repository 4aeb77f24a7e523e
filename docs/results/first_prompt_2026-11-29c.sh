# 2026-11-29c (nvidia-h200), branch storage-moves (unit_storage=auto, the default): fresh processes, each cold (empty compile cache) then warm
# (the cache of the run before): mistral-7b 128K bench.py --repeats 1; SmolLM2 128K and 983K generate.py.
# Needs a checkpoint folder with the SmolLM2 tokenizer files in .stage17/tokck (not in git).
set -u
export PYTHONUNBUFFERED=1
date -u
export INFLLM_COMPILE_CACHE=$HOME/ccM; rm -rf $INFLLM_COMPILE_CACHE
for i in cold warm; do
  t0=$EPOCHREALTIME
  timeout 90 python scripts/bench.py --shape mistral-7b --lengths 128K --decode 32 --repeats 1 --kernel triton --graphs --json > $HOME/m.out 2>&1
  t1=$EPOCHREALTIME
  echo "{\"run\": \"mistral128k-$i\", \"wall_s\": $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}"), \"json\": $(grep '^{' $HOME/m.out | tail -1 || echo null)}" | tee -a $OUT/first.jsonl | cut -c1-400
done
CK=$HOME/ck; mkdir -p $CK && cp .stage17/tokck/* $CK/
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
for name, L in (('128k', 128 * 1024), ('960k', 960 * 1024)):
    open('$HOME/%s.txt' % name, 'w').write(prompt_text(*layout(tok, L, 0.5, 72413), 72413))
print('ready')
PY
date -u
for L in 128k 960k; do
  export INFLLM_COMPILE_CACHE=$HOME/cc$L; rm -rf $INFLLM_COMPILE_CACHE
  N=64; [ $L = 960k ] && N=8
  for i in cold warm; do
    t0=$EPOCHREALTIME
    timeout 90 python generate.py --ckpt $CK --max-new-tokens $N --no-progress --json --prompt-file $HOME/$L.txt > $HOME/g.out 2>&1
    t1=$EPOCHREALTIME
    echo "{\"run\": \"smollm2-$L-$i\", \"wall_s\": $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}"), \"json\": $(grep '^{' $HOME/g.out | tail -1 || echo null)}" | tee -a $OUT/first.jsonl | cut -c1-400
    tail -3 $HOME/g.out | grep -i error
  done
done
date -u
date -u
