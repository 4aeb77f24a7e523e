"""Does the lookup find the needle? One prompt of scripts/niah.py, read by InfLLM; for every layer, the rank of
the memory unit that holds the needle among the lookup's scores, when the prompt's last token looks up (its
answer's first token comes from there) and at each decoding step after it.

A failed retrieval has two possible causes, and they call for different fixes: the lookup never selects the
needle's unit (the representative keys or the query miss it), or it does and the model still does not read the
value out of memory (positions, the model's size). The ranks tell them apart. Each query head's own ranks tell
whether a selection per head would find what the one selection per layer (scores summed over heads) misses.

    python scripts/needle_units.py --ckpt checkpoints/smollm2-135m-instruct --haystack prose --length 16K \\
        --depth 0.25 --digits 5 --steps 8
"""
import argparse
import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402
from infllm import InfLLMConfig  # noqa: E402
from model import DTYPES  # noqa: E402
from niah import HAYSTACKS, Parts, build_prompt, haystack, make_sample  # noqa: E402
from reader import decode, load, pick_device, prefill  # noqa: E402
from sweep import UsageError, parse_length  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def unit_of(position: int, cfg: InfLLMConfig) -> int | None:
    """The memory unit a prompt token ends up in: tokens leave the window in order, the first n_init of them
    go to init, and every block_size run after that becomes the next unit (INFLLM.md). None for init tokens."""
    if position < cfg.n_init:
        return None
    return (position - cfg.n_init) // cfg.block_size


def needle_units(start: int, n_tokens: int, cfg: InfLLMConfig) -> list[int]:
    """The units that hold a needle of n_tokens tokens starting at `start` (one, or two when a cut splits it)."""
    return sorted({u for p in range(start, start + n_tokens) if (u := unit_of(p, cfg)) is not None})


def ranks(caches, units: list[int]) -> list[list[int | None]]:
    """Per layer, the rank (1: best) of each of `units` among the last lookup's scores over the stored units;
    None for a unit not stored yet (still in the window)."""
    out = []
    for c in caches:
        m = c.units
        n = m.count
        scores = m.last["scores"][:n].float().cpu()
        out.append([int((scores > scores[u]).sum()) + 1 if u < n else None for u in units])
    return out


def head_scores(units) -> torch.Tensor:
    """Each query head's own share of the last single-token lookup's scores [n, Hq] (their sum over heads is
    the lookup's score): what a selection per head, rather than one per layer, would rank units by."""
    q = units.last["queries"][:, 0].double()  # [Hq, D]: one token's lookup
    n, (Hq, D) = units.count, q.shape
    keys = units.reprs[:n].double().view(n, Hq, D)  # one representative key per head (the mean of repr_topk)
    return torch.einsum("nhd,hd->nh", keys, q)


def head_ranks(caches, units: list[int]) -> list[list[int | None]]:
    """Per layer and query head, the best rank (1: best) of `units` by that head's score alone."""
    out = []
    for c in caches:
        s = head_scores(c.units)  # [n, Hq]
        stored = [u for u in units if u < s.shape[0]]
        out.append([min((int((s[:, h] > s[u, h]).sum()) + 1 for u in stored), default=None) for h in range(s.shape[1])])
    return out


def trace(args) -> dict:
    cfg = InfLLMConfig.parse(args.infllm)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    tok = load_tokenizer(args.ckpt)
    parts = Parts(tok)
    s = make_sample(args.task, "words", "numbers", args.seed, 0, args.digits)
    prompt = build_prompt(parts, haystack(args.haystack, parts), s, args.length, args.depth)
    asked = prompt.needle_at[0]  # the asked needle is the first one (single and multikey)
    units = needle_units(asked, len(parts.later(s.needles[0])), cfg)
    model, _ = load(args.ckpt, device, dtype)
    engine.accelerate(model)
    # The engine's caches: they can keep each lookup's queries and scores (the reference keeps the selection only)
    caches = engine.make_caches(model, "infllm", cfg, kernel=engine.pick_kernel(device, "infllm", False))
    for c in caches:
        c.units.last = {}  # keep each lookup's queries and scores
    logits = prefill(model, caches, prompt.ids, cfg.chunk_size, room=args.steps + 1)
    # on_token sees each new token before it is fed: the last lookup then is the one whose logits chose it
    # (the prompt's last token for the first one).
    steps, heads = [], []

    def look(ids):
        steps.append(ranks(caches, units))
        heads.append(head_ranks(caches, units))

    new = decode(model, caches, logits, args.steps + 1, on_token=look)
    return {"haystack": args.haystack, "length": len(prompt.ids), "depth": args.depth, "needle_at": asked,
            "tokens_back": len(prompt.ids) - asked, "needle_units": units, "stored_units": caches[0].units.count,
            "topk": cfg.topk, "answer": tok.decode(new), "expected": s.expected,
            "ranks": steps,  # [step][layer][needle unit]
            "head_ranks": heads}  # [step][layer][query head]: the best needle unit's rank by that head alone


def report(r: dict) -> str:
    topk = r["topk"]
    best = [[min((x for x in layer if x is not None), default=None) for layer in step] for step in r["ranks"]]
    picked = [sum(x is not None and x <= topk for x in step) for step in best]
    lines = [f"{r['haystack']} {r['length']} tokens, needle {r['tokens_back']} tokens back in unit(s) {r['needle_units']} "
             f"of {r['stored_units']}; answer {r['answer']!r} (expected {', '.join(r['expected'])})",
             "layers that selected the needle's unit (rank <= topk), at the last prompt token, then each decoding step: "
             + " ".join(str(p) for p in picked) + f" of {len(best[0])}",
             "its best rank per layer at the last prompt token: " + " ".join(str(x) for x in best[0])]
    if r.get("head_ranks"):
        per_head = [[x is not None and x <= topk for layer in step for x in layer] for step in r["head_ranks"]]
        lines.append("query heads whose own scores put it in their topk, at the last prompt token, then each decoding "
                     f"step: {' '.join(str(sum(h)) for h in per_head)} of {len(per_head[0])}; layers with at least one "
                     f"such head: {' '.join(str(sum(any(x is not None and x <= topk for x in layer) for layer in step)) for step in r['head_ranks'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--task", default="single", choices=["single", "multikey"])
    p.add_argument("--haystack", default="prose", choices=list(HAYSTACKS))
    p.add_argument("--length", default="16K")
    p.add_argument("--depth", type=float, default=0.25)
    p.add_argument("--digits", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8, help="decoding steps to trace")
    p.add_argument("--infllm", default="", metavar="KEY=VALUE,...")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        args.length = parse_length(args.length)
        if not 0 <= args.depth <= 1:
            raise UsageError(f"--depth must be between 0 and 1, not {args.depth}")
        if not Path(args.ckpt).is_dir():
            raise UsageError(f"checkpoint folder {args.ckpt} does not exist")
        r = trace(args)
    except (UsageError, ValueError) as e:
        print(f"needle_units.py: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
