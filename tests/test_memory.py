"""Read once, ask many times: memory snapshots (--save-memory / --load-memory), the interactive mode, the
Python entry point (reader.Reader) and the memory plan, for both engines. The oracle throughout is one process
that reads the document and then the question: a saved, loaded or rewound memory must answer exactly as it does."""
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.storage import memory_plan
from reader import Reader, SnapshotError, UsageError, read_snapshot_header

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "smollm2-135m-instruct"
needs_ckpt = pytest.mark.skipif(not (CKPT / "model.safetensors").exists(),
                                reason="run `python scripts/prepare_test_model.py` first")

# Knobs small enough that a few hundred tokens make units, evictions and lookups.
SMALL = "n_init=8,n_local=64,block_size=16,topk=2,max_cached_block=3,exc_block_size=32,chunk_size=96"
DOC = " ".join(f"item{i} is {i * 7 % 13}." for i in range(90))  # several hundred tokens, not a multiple of 32
QUESTIONS = ["\nWhat is item3?", "\nAnd item71 is"]


def reader(ckpt, attention="infllm", infllm=SMALL, engine="reference", **kw):
    return Reader(ckpt, "cpu", "fp32", attention, infllm, engine=engine, **kw)


def units(r) -> int:
    """Memory units layer 0 holds."""
    return r.caches[0].stats()["units"]


def ask_logits(r, question):
    """The logits after a question, from the memory after the document."""
    r.rewind()
    return r.feed(r.tok.encode(question), room=8)


def one_process(ckpt, attention, infllm, question, engine="reference"):
    """The oracle: a fresh reader reads the document, then the question; logits and greedy answer."""
    r = reader(ckpt, attention, infllm, engine)
    r.read(DOC)
    logits = r.feed(r.tok.encode(question), room=8)
    return logits, r.answer(logits, 8)


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT, input=stdin)


@pytest.mark.parametrize("attention, infllm, engine", [
    *[(a, s, e) for a, s in (("infllm", SMALL), ("stream", SMALL), ("full", "")) for e in ("reference", "fast")],
    ("infllm", SMALL + ",unit_dtype=fp8", "fast"),  # the engine's only (tests/test_generate.py: the reference refuses)
])
def test_loaded_and_rewound_memory_answer_like_one_process(tiny_ckpt, tmp_path, attention, infllm, engine):
    r = reader(tiny_ckpt, attention, infllm, engine)
    r.read(DOC)
    assert r.tokens > 4 * 64 and r.tokens % 32
    if attention == "infllm":
        assert units(r) > 8, "the document must make memory units"
    r.save(tmp_path / "doc.mem")
    loaded = reader(tiny_ckpt, attention, infllm, engine)
    loaded.load(tmp_path / "doc.mem")
    assert loaded.tokens == r.tokens
    for q in QUESTIONS:  # each question after the other: the first must not leak into the second
        ref_logits, ref = one_process(tiny_ckpt, attention, infllm, q, engine)
        for who in (r, loaded):  # rewound where the document was read, and loaded in another reader
            assert torch.equal(ask_logits(who, q), ref_logits)
            assert who.ask(q, 8) == ref


def data_bytes(path) -> int:
    """A snapshot's size less its header (8 bytes of length, then the JSON index of its tensors)."""
    data = Path(path).read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


def buffer_shapes(r) -> dict:
    """The shapes of the tensors layer 0's cache holds, its memory units' too (the engine's)."""
    c = r.caches[0]
    held = dict(vars(c))
    if getattr(c, "units", None) is not None:
        held |= {"units." + n: t for n, t in vars(c.units).items()}
    return {n: tuple(t.shape) for n, t in held.items() if isinstance(t, torch.Tensor)}


def bytes_a_token(args, attention, infllm, dtype) -> float:
    """What one more token adds to a snapshot once the window is full, from the model's shape alone (not from
    the caches, whose buffers the test checks): full attention keeps every token's key and value in every
    layer; InfLLM keeps them in its memory units (fp8: one byte an element), and a unit of block_size tokens
    adds its representative key (a vector per query head, in the model's dtype) and, with fp8, a float32 scale
    per key-value head for its keys and another for its values; the stream cache forgets the token."""
    e = torch.empty(0, dtype=dtype).element_size()
    L, Hq, Hkv, D = args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim
    kv = 2 * L * Hkv * D
    if attention == "full":
        return kv * e
    if attention == "stream":
        return 0.0
    fp8 = "unit_dtype=fp8" in infllm
    B = int(dict(kv.split("=") for kv in infllm.split(","))["block_size"])
    per_unit = L * (Hq * D * e + (2 * Hkv * 4 if fp8 else 0))
    return kv * (1 if fp8 else e) + per_unit / B


@pytest.mark.parametrize("attention, infllm, engine", [
    *[(a, s, e) for a, s in (("infllm", SMALL), ("stream", SMALL), ("full", "")) for e in ("reference", "fast")],
    ("infllm", SMALL + ",unit_dtype=fp8", "fast"),
])
def test_a_snapshot_grows_with_the_document_not_the_buffers(tiny_ckpt, tmp_path, attention, infllm, engine):
    """A snapshot holds what the document filled, never the buffers reserved for it: a one-token document
    (with the default settings, whose window buffers alone hold 4,736 tokens) saves under 1 MB besides its
    header, and loads into buffers of the shapes a fresh reader has, answering as the reader that saved it;
    from N to 2N tokens the file grows by N times the bytes a token keeps (within 10%: units come a block at a
    time, and the window holds between n_local and n_local + block_size - 1 tokens)."""
    one = reader(tiny_ckpt, attention, infllm.replace(SMALL, "").strip(","), engine)
    one.read("hi")
    assert one.tokens == 1
    one.save(tmp_path / "one.mem")
    assert data_bytes(tmp_path / "one.mem") < 2**20
    loaded = reader(tiny_ckpt, attention, infllm.replace(SMALL, "").strip(","), engine)
    loaded.load(tmp_path / "one.mem")
    assert buffer_shapes(loaded) == buffer_shapes(one)  # the engine's ring buffers too: fixed, 4,736 tokens
    assert engine == "reference" or attention == "full" or buffer_shapes(loaded)["ring_k"][1] > 4096
    assert torch.equal(ask_logits(loaded, QUESTIONS[0]), ask_logits(one, QUESTIONS[0]))

    sizes = []
    for items in (150, 300):  # some 1,000 and 2,000 tokens: far beyond SMALL's window of 64
        r = reader(tiny_ckpt, attention, infllm, engine)
        r.read(" ".join(f"item{i} is {i * 7 % 13}." for i in range(items)))
        r.save(tmp_path / "doc.mem")
        sizes.append((r.tokens, data_bytes(tmp_path / "doc.mem")))
    (n1, s1), (n2, s2) = sizes
    assert n1 > 900 and n2 > 1.9 * n1
    grown, want = (s2 - s1) / (n2 - n1), bytes_a_token(r.model.args, attention, infllm, r.dtype)
    if attention == "stream":  # bounded by the window: less than a tenth of the keys and values of a token
        assert abs(grown) < 0.1 * bytes_a_token(r.model.args, "full", "", r.dtype)
    else:
        assert abs(grown - want) < 0.1 * want, (grown, want)


@needs_ckpt
def test_smollm2_answers_after_load_like_one_process(tmp_path):
    """The real model: a document whose answer lies in the memory units, saved and loaded by the CLI."""
    doc = "Notes. " + "The grass is green. The sky is blue. " * 40 + "The code is 4721. " + "Here we go. " * 60
    knobs = "n_init=16,n_local=128,block_size=16,topk=4,max_cached_block=6,exc_block_size=64,chunk_size=256"
    question = "\nWhat is the code? The code is"
    base = ["--ckpt", CKPT, "--device", "cpu", "--infllm", knobs, "--json"]
    (tmp_path / "doc.txt").write_text(doc)
    saved = cli(*base, "--prompt-file", tmp_path / "doc.txt", "--save-memory", tmp_path / "doc.mem", "--max-new-tokens", 0)
    assert saved.returncode == 0, saved.stderr
    assert json.loads(saved.stdout)["new_tokens"] == 0 and json.loads(saved.stdout)["snapshot_gib"] > 0
    answered = cli(*base, "--load-memory", tmp_path / "doc.mem", "--prompt", question, "--max-new-tokens", 6)
    assert answered.returncode == 0, answered.stderr
    r = Reader(CKPT, "cpu", "fp32", "infllm", knobs)  # the CLI's engine on a CPU: the reference
    r.read(doc)
    assert units(r) > 10
    logits = r.feed(r.tok.encode(question), room=6)
    assert json.loads(answered.stdout)["text"] == r.answer(logits, 6)
    assert "4721" in json.loads(answered.stdout)["text"]


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_interactive_answers_each_question_like_a_fresh_run(tiny_ckpt, tmp_path, engine):
    (tmp_path / "doc.txt").write_text(DOC)
    base = ["--ckpt", tiny_ckpt, "--device", "cpu", "--engine", engine, "--infllm", SMALL, "--max-new-tokens", 5,
            "--json"]
    r = cli(*base, "--prompt-file", tmp_path / "doc.txt", "--interactive",
            stdin="".join(q.removeprefix("\n") + "\n" for q in QUESTIONS))
    assert r.returncode == 0, r.stderr
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(answers) == 2
    assert cli(*base[:-3], "--prompt-file", tmp_path / "doc.txt", "--save-memory", tmp_path / "doc.mem",
               "--max-new-tokens", 0).returncode == 0
    for q, got in zip(QUESTIONS, answers):
        fresh = cli(*base, "--load-memory", tmp_path / "doc.mem", "--prompt", q)
        assert fresh.returncode == 0, fresh.stderr
        assert got["text"] == json.loads(fresh.stdout)["text"] and got["new_tokens"] == 5
        assert got["memory_tokens"] == json.loads(fresh.stdout)["memory_tokens"]
    # And from a loaded snapshot, questions on stdin.
    loaded = cli(*base, "--load-memory", tmp_path / "doc.mem", "--interactive", stdin=QUESTIONS[1].strip() + "\n")
    assert loaded.returncode == 0 and json.loads(loaded.stdout)["text"] == answers[1]["text"]


@pytest.fixture(scope="module")
def snapshot(tiny_ckpt, tmp_path_factory):
    """A document's memory saved by the reference (a CPU's default engine)."""
    path = tmp_path_factory.mktemp("snap") / "doc.mem"
    r = reader(tiny_ckpt)
    r.read(DOC)
    r.save(path)
    return path


def test_a_snapshot_loads_only_into_the_engine_that_saved_it(tiny_ckpt, snapshot, tmp_path):
    fast = reader(tiny_ckpt, engine="fast")
    with pytest.raises(SnapshotError, match=r"^memory snapshot \S+ was saved by --engine reference, .*: load it "
                                            r"with --engine reference$"):
        fast.load(snapshot)
    fast.read(DOC)
    fast.save(tmp_path / "fast.mem")
    assert read_snapshot_header(tmp_path / "fast.mem")["engine"] == "fast"
    with pytest.raises(SnapshotError, match=r"saved by --engine fast, .*: load it with --engine fast$"):
        reader(tiny_ckpt).load(tmp_path / "fast.mem")


def _other_checkpoint(tiny_ckpt, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rope_theta": 20000.0}))
    return other


@pytest.mark.parametrize("case, words", [
    ("other-checkpoint", "checkpoint"),
    ("other-dtype", "dtype"),
    ("other-attention", "attention"),
    ("other-settings", "settings"),
    ("other-engine", "--engine reference"),
    ("truncated", "not a readable memory snapshot"),
    ("foreign", "not a memory snapshot"),
    ("older-format", "format 'infllm-memory/1', of another version"),
    ("garbage", "not a readable memory snapshot"),
    ("missing", "does not exist"),
    ("no-question", "give a prompt"),
])
def test_bad_snapshots_are_refused_and_left_untouched(tiny_ckpt, snapshot, tmp_path, case, words):
    path, ckpt, extra = tmp_path / "doc.mem", tiny_ckpt, []
    if case == "truncated":
        path.write_bytes(snapshot.read_bytes()[:-1000])
    elif case == "foreign":  # a safetensors file, but a model's weights
        shutil.copy(tiny_ckpt / "model.safetensors", path)
    elif case == "garbage":
        path.write_bytes(b"\x00\x10" * 5000)
    elif case == "older-format":  # the layout of version 1 differs: its header must turn it away
        _with_meta(snapshot, path, lambda meta: meta | {"format": "infllm-memory/1"})
    elif case != "missing":
        shutil.copy(snapshot, path)
    if case == "other-checkpoint":
        ckpt = _other_checkpoint(tiny_ckpt, tmp_path)
    extra = {"other-dtype": ["--dtype", "bf16"], "other-attention": ["--attention", "stream"],
             "other-settings": ["--infllm", SMALL.replace("topk=2", "topk=3")],
             "other-engine": ["--infllm", SMALL, "--engine", "fast"]}.get(case, ["--infllm", SMALL])
    before = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    prompt = [] if case == "no-question" else ["--prompt", "\nWhat is item3?"]
    r = cli("--ckpt", ckpt, "--device", "cpu", "--load-memory", path, *prompt, "--max-new-tokens", 2, *extra)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert r.stdout == ""
    assert (hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None) == before


def _with_meta(snapshot, path, change):
    """A copy of snapshot whose header is change(header). The header is the safetensors one: 8 bytes of length
    (little-endian), then JSON whose "__metadata__" holds ours."""
    data = snapshot.read_bytes()
    size = int.from_bytes(data[:8], "little")
    index = json.loads(data[8:8 + size])
    index["__metadata__"] = change(index["__metadata__"])
    head = json.dumps(index).encode()
    head += b" " * (-len(head) % 8)  # the tensors' offsets count from the data, which stays 8-byte aligned
    path.write_bytes(len(head).to_bytes(8, "little") + head + data[8 + size:])
    return path


def _with_settings(snapshot, path, change):
    """A copy of snapshot whose header records the settings change(settings) gives (a dict, or the text
    itself)."""
    def meta(m):
        settings = change(json.loads(m["settings"]))
        return m | {"settings": settings if isinstance(settings, str) else json.dumps(settings)}
    return _with_meta(snapshot, path, meta)


def _old(settings):
    """settings as a snapshot made before a setting existed records them: here repr_topk, as if it were newer
    than the snapshot (SMALL keeps its default)."""
    return {k: v for k, v in settings.items() if k != "repr_topk"}


def test_a_snapshot_from_before_newer_settings_loads_as_their_defaults(tiny_ckpt, snapshot, tmp_path):
    old = _with_settings(snapshot, tmp_path / "old.mem", _old)
    assert "repr_topk" not in read_snapshot_header(old)["settings"]
    r = reader(tiny_ckpt)
    r.load(old)
    for q in QUESTIONS:
        ref_logits, ref = one_process(tiny_ckpt, "infllm", SMALL, q)
        assert torch.equal(ask_logits(r, q), ref_logits)
        assert r.ask(q, 8) == ref


@pytest.mark.parametrize("recorded, option", [
    ("old", "repr_topk=2"),  # no key: the default, 4, which this run does not use
    ("repr_topk=3", ""),  # a recorded value still counts
])
def test_a_snapshot_with_other_settings_is_refused(tiny_ckpt, snapshot, tmp_path, recorded, option):
    change = _old if recorded == "old" else lambda s: s | dict([recorded.split("=")])
    path = _with_settings(snapshot, tmp_path / "doc.mem", change)
    with pytest.raises(SnapshotError, match=r"^memory snapshot \S+ was made with settings '\{.*\}', this run has '\{.*\}'$"):
        reader(tiny_ckpt, infllm=SMALL + "," + option).load(path)


def test_a_snapshot_with_unreadable_settings_is_refused(tiny_ckpt, snapshot, tmp_path):
    path = _with_settings(snapshot, tmp_path / "bad.mem", lambda s: "not json {")
    with pytest.raises(SnapshotError, match=r"was made with settings 'not json \{', this run has"):
        reader(tiny_ckpt).load(path)


def test_a_larger_pool_loads_the_same_memory(tiny_ckpt, snapshot):
    """max_cached_block changes speed, never outputs: a snapshot loads with another pool size."""
    r = reader(tiny_ckpt, infllm=SMALL.replace("max_cached_block=3", "max_cached_block=16"))
    r.load(snapshot)
    assert torch.equal(ask_logits(r, QUESTIONS[0]), one_process(tiny_ckpt, "infllm", SMALL, QUESTIONS[0])[0])


def _cache_bytes(caches):
    """What the caches hold, counted from their buffers (host and device are one on a CPU)."""
    total = 0
    for c in caches:
        bufs = [c.ring_k, c.ring_kr, c.ring_v, c.ring_score, c.ring_pos, c.init_k, c.init_v]
        if c.use_units:
            u = c.units
            bufs += [u.storage_k, u.storage_v, u.reprs, u.unit_slot, u.pool_k, u.pool_v]
            bufs += [u.scales] if u.fp8 else []
        total += sum(t.numel() * t.element_size() for t in bufs)
    return total


@pytest.mark.parametrize("attention, infllm", [("infllm", SMALL), ("infllm", SMALL + ",unit_dtype=fp8"),
                                               ("stream", SMALL)])
def test_memory_plan_counts_what_the_caches_take(tiny_ckpt, attention, infllm):
    r = reader(tiny_ckpt, attention, infllm, engine="fast")  # the plan counts the engine's buffers
    r.read(DOC, room=40)
    plan = memory_plan(r.model.args, attention, r.cfg, r.tokens + 40, torch.float32, "cpu")
    assert plan["device"] == 0 and plan["host"] == _cache_bytes(r.caches)
    gpu = memory_plan(r.model.args, attention, r.cfg, 2**20, torch.bfloat16, "cuda")
    if attention == "infllm":  # on a GPU only the units live in host memory
        assert gpu["host"] == gpu["parts"]["memory units"] > gpu["device"] > 0
        fp8 = "fp8" in infllm
        assert gpu["parts"]["memory units"] == (1 if fp8 else 2) * 2 * 2 * 8 * 16 * 2 * (2**20 // 16 + 2)
        cfg = dataclasses.replace(r.cfg, unit_storage="device")  # units in GPU memory: no host memory at all
        on_gpu = memory_plan(r.model.args, attention, cfg, 2**20, torch.bfloat16, "cuda")
        assert on_gpu["host"] == 0 and on_gpu["device"] == gpu["device"] + gpu["host"] and on_gpu["parts"] == gpu["parts"]
        assert memory_plan(r.model.args, attention, cfg, 2**20, torch.bfloat16, "cpu") == \
            memory_plan(r.model.args, attention, r.cfg, 2**20, torch.bfloat16, "cpu")


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_memory_too_large_is_refused_before_the_prefill(tiny_ckpt, tmp_path, engine):
    r = reader(tiny_ckpt, engine=engine)
    budget = memory_plan(r.model.args, "infllm", r.cfg, 8000, torch.float32, "cpu")["host"]
    r = reader(tiny_ckpt, host_memory=budget, engine=engine)
    doc = DOC * 30  # some 12,000 tokens: more than the budget holds
    with pytest.raises(UsageError, match="MiB of host memory .* is free"):
        r.read(doc)
    assert r.tokens == 0, "nothing was fed"
    if engine == "fast":
        assert r.caches[0].units.capacity < 100, "nothing was allocated"
    r.read(DOC)  # a document that fits is read
    (tmp_path / "doc.txt").write_text(doc)
    out = cli("--ckpt", tiny_ckpt, "--device", "cpu", "--engine", engine, "--infllm", SMALL, "--prompt-file",
              tmp_path / "doc.txt", "--host-memory", budget / 2**30, "--no-progress")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "unit_dtype=fp8" in out.stderr, out.stderr


def test_chat_document_opens_the_turn_each_question_closes(tiny_ckpt):
    """With chat, document + question is one user turn of the checkpoint's template, and the memory after
    the question is that of the whole turn read in the same two parts."""
    from tokenizer import chat_prompt
    r = reader(tiny_ckpt, chat=True)
    head, tail = r.chat
    assert head + DOC + QUESTIONS[0] + tail == chat_prompt(tiny_ckpt, r.tok, DOC + QUESTIONS[0])
    r.read(DOC)
    marked = r.tokens  # the memory after the document, which each question starts from
    answer = r.ask(QUESTIONS[0], 6)
    one = reader(tiny_ckpt)  # no chat: the template's text written out by hand
    one.read(head + DOC)
    assert one.tokens == marked
    assert one.answer(one.feed(one.tok.encode(QUESTIONS[0] + tail), room=6), 6) == answer


# ------------------------------------------------------------------------------------------ an empty question


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_an_empty_question_continues_the_document(tiny_ckpt, tmp_path, monkeypatch, engine):
    """ask("") answers from the logits after the document: the tokens greedy (and seeded sampling) decoding
    gives straight after reading it, in one process; the same after another question, and after save and load."""
    import reader as reader_module
    decoded = []
    real = reader_module.decode
    monkeypatch.setattr(reader_module, "decode", lambda *a, **k: decoded.append(real(*a, **k)) or decoded[-1])

    def straight(**sampling):  # the oracle: read, decode from the logits the prefill gave
        one = reader(tiny_ckpt, engine=engine, progress=False)
        one.answer(one.read(DOC), 8, **sampling)
        return decoded.pop(), one.tokens

    r = reader(tiny_ckpt, engine=engine, progress=False)
    r.read(DOC)
    r.save(tmp_path / "doc.mem")
    loaded = reader(tiny_ckpt, engine=engine, progress=False)
    loaded.load(tmp_path / "doc.mem")
    for sampling in ({}, {"temperature": 1.0, "top_k": 100, "seed": 5}):
        want, tokens = straight(**sampling)
        assert len(want) == 8
        for who in (r, loaded):
            who.ask("", 8, **sampling)
            assert decoded.pop() == want and who.tokens == tokens and who.figures["prompt_tokens"] == 0
            who.ask(QUESTIONS[0], 3)  # a question between: the next empty one starts from the document again
            decoded.pop()
            who.ask("", 8, **sampling)
            assert decoded.pop() == want
    assert len(set(want)) > 1, "the sampled tokens tell logits apart (greedy on random weights repeats one)"


def test_a_snapshot_without_the_last_logits_refuses_only_an_empty_question(tiny_ckpt, tmp_path):
    """A snapshot saved before the logits after the document were kept: questions as ever, and one sentence
    for an empty question."""
    from reader import save_memory
    r = reader(tiny_ckpt, progress=False)
    r.read(DOC)
    r.rewind()
    save_memory(tmp_path / "old.mem", r.caches, r.header() | {"tokens": r.tokens})  # the layers alone
    old = reader(tiny_ckpt, progress=False)
    old.load(tmp_path / "old.mem")
    assert old.last_logits is None and old.ask(QUESTIONS[0], 4) == r.ask(QUESTIONS[0], 4)
    with pytest.raises(SnapshotError, match=r"^this memory snapshot does not hold the logits after its document "
                                            r"\(.*\): ask a question, or save the document again$"):
        old.ask("", 4)


def test_the_cli_answers_an_empty_question_after_load_memory(tiny_ckpt, tmp_path, capsys):
    import generate
    base = ["--ckpt", str(tiny_ckpt), "--device", "cpu", "--infllm", SMALL, "--json"]
    (tmp_path / "doc.txt").write_text(DOC)
    assert generate.main(base + ["--prompt-file", str(tmp_path / "doc.txt"), "--save-memory",
                                 str(tmp_path / "doc.mem"), "--max-new-tokens", "0"]) == 0
    (tmp_path / "empty.txt").write_text("")
    for prompt in (["--prompt", ""], ["--prompt-file", str(tmp_path / "empty.txt")]):
        capsys.readouterr()
        assert generate.main(base + ["--load-memory", str(tmp_path / "doc.mem"), *prompt,
                                     "--max-new-tokens", "5", "--temperature", "1", "--seed", "3"]) == 0
        out = json.loads(capsys.readouterr().out)
        one = reader(tiny_ckpt, progress=False)
        assert out["text"] == one.answer(one.read(DOC), 5, temperature=1.0, seed=3)
        assert out["prompt_tokens"] == 0 and out["new_tokens"] == 5 and out["prefill_tok_s"] is None


# ------------------------------------------------------------------------------------------ progress


def test_read_and_load_show_a_bar_that_ends_at_the_end(tiny_ckpt, snapshot, capsys):
    """Reader's progress (on by default): a bar on stderr while a document is read, which ends at its last
    token (fed alone after the chunks), and one while a snapshot loads; progress=False shows none."""
    r = reader(tiny_ckpt)
    r.read(DOC)
    err = capsys.readouterr().err
    assert "prefill" in err and f"{r.tokens}/{r.tokens}" in err, err
    r.load(snapshot)
    err = capsys.readouterr().err
    n = len(r.caches)
    assert "loading" in err and f"{n}/{n}" in err, err
    quiet = reader(tiny_ckpt, progress=False)
    quiet.read(DOC)
    quiet.load(snapshot)
    assert capsys.readouterr().err == ""


def test_the_cli_shows_the_loading_bar_but_not_with_json(tiny_ckpt, snapshot, capsys):
    import generate
    base = ["--ckpt", str(tiny_ckpt), "--device", "cpu", "--infllm", SMALL, "--load-memory", str(snapshot),
            "--prompt", QUESTIONS[0], "--max-new-tokens", "2"]
    assert generate.main(base) == 0
    assert "loading" in capsys.readouterr().err
    for quiet in (["--json"], ["--no-progress"]):
        assert generate.main(base + quiet) == 0
        assert "loading" not in capsys.readouterr().err
