"""Run one passkey prompt through the reference and the engine's paths and compare the greedy tokens.

    python scripts/compare_paths.py --ckpt DIR --length 32K [--kernels reference,triton+graphs] [--depth 0.5]

The fast path must give the reference's answer on a real model and a real prompt, not only on random
tensors; the seconds per prompt are printed beside it. "reference" is generate.py --engine reference; an
engine path is a kernel of engine.attention.CHUNK_ATTENTION, +graphs replayed from CUDA graphs (on a GPU,
"triton+graphs" is generate.py --engine fast).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402
import infllm  # noqa: E402
from engine.graphs import forward_fn  # noqa: E402
from infllm import InfLLMConfig, memory_stats  # noqa: E402
from model import DTYPES  # noqa: E402
from passkey import build_prompt, found, parse_length  # noqa: E402
from reader import decode, load, pick_device, plain_forward, prefill  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--length", default="32K")
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--key", type=int, default=71432)
    p.add_argument("--kernels", default="reference,triton+graphs",
                   help="reference, or a kernel of engine.attention.CHUNK_ATTENTION (KERNEL+graphs replays CUDA graphs)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--infllm", default="")
    p.add_argument("--new-tokens", type=int, default=10)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = InfLLMConfig.parse(args.infllm)
    model, tok = load(args.ckpt, device, dtype)
    ids = build_prompt(tok, parse_length(args.length), args.depth, args.key)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    answers = {}
    # The reference first: the engine swaps the model's forwards for its own (engine.accelerate).
    for name in sorted(args.kernels.split(","), key=lambda n: n != "reference"):
        kernel, _, graphs = name.partition("+")  # KERNEL+graphs: replayed from CUDA graphs
        if kernel == "reference":
            caches = infllm.make_caches(model, "infllm", cfg)
            forward = plain_forward(model, caches)
        else:
            engine.accelerate(model)
            caches = engine.make_caches(model, "infllm", cfg, kernel)
            forward = forward_fn(model, caches, graphs=graphs == "graphs")
        for c in caches:
            c.reserve(len(ids) + args.new_tokens)  # now, so that no later growth drops captured graphs
        warm = 0.0
        if device.type == "cuda":
            # Compile and capture outside the timing, on a short prompt: every forward is a piece or a token
            # whatever the prompt's length, so any prompt of a piece and a decoding step compiles them all.
            sync()
            t0 = time.perf_counter()
            short = ids[:cfg.exc_block_size + 2]
            decode(model, caches, prefill(model, caches, short, cfg.chunk_size, forward=forward), args.new_tokens,
                   forward=forward)
            for c in caches:
                c.reset()
            sync()
            warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        logits = prefill(model, caches, ids, cfg.chunk_size, forward=forward)
        new = decode(model, caches, logits, args.new_tokens, forward=forward)
        sync()
        seconds = time.perf_counter() - t0
        answers[name] = new
        text = tok.decode(new)
        print(f"{name:>9}: {len(ids)} tokens, {seconds:.1f} s (warm-up {warm:.1f} s), found={found(text, args.key)}, "
              f"hit rate {memory_stats(caches)['hit_rate'] or 0:.1%}, answer {text!r}", flush=True)
    same = len({tuple(a) for a in answers.values()}) == 1
    if len(answers) > 1:
        print("same greedy tokens:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
