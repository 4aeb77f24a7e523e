"""Run by tests/test_parallel.py, alone or under torchrun: a document read by the engine through FixedShapes' pieces
on the CPU (the shapes the GPU replays), then greedy answers through decode_ahead, free and with a stop token.
Process 0 prints the tokens, the positions and the statistics as one JSON line."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.graphs import FixedShapes  # noqa: E402
from infllm import memory_stats  # noqa: E402
from reader import Reader, decode  # noqa: E402
from tp import join_processes, leave_processes  # noqa: E402


def main(ckpt, prompt, infllm):
    rank, world, device = join_processes("cpu")
    r = Reader(ckpt, device="cpu", infllm=infllm, rank=rank, world=world, engine="fast")
    r.forward = FixedShapes(r.model, r.caches, graphs=False)  # what a GPU replays, here run eagerly
    logits = r.read(prompt)
    free = decode(r.model, r.caches, logits, 8, forward=r.forward)
    r.rewind()  # back to the document: the same logits follow it
    stopped = decode(r.model, r.caches, logits, 8, (free[2],), forward=r.forward)
    after = r.feed(r.tok.encode(" So"))
    out = {"free": free, "stopped": stopped, "stop": free[2], "pos": [c.pos for c in r.caches], "pos_d": [int(c.pos_d) for c in r.caches],
           "stats": memory_stats(r.caches), "after": int(after.argmax())}
    r = None
    leave_processes()
    if rank == 0:
        print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
