"""tokenizer.py against independent implementations: `tokenizers` (byte-level BPE, and a Llama-style BPE built
from the sentencepiece pieces), transformers' tiktoken converter, and the sentencepiece library itself."""
import base64
import inspect
import json
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import regex
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tokenizer import (  # noqa: E402
    BYTE_CHARS,
    LLAMA3_PATTERN,
    BPETokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    chat_prompt,
    load_tokenizer,
)

SMOLLM2 = ROOT / "checkpoints" / "smollm2-135m-instruct"
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 splits numbers into single digits
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "12345 67890",
    "The year 2024 had 366 days; π ≈ 3.14159 and 1,000,000.5",
    "Café naïve résumé coöperate Ångström, e\u0301 (combining) vs é",
    "你好，世界！这是一个测试。日本語のテキスト、カタカナ。한국어 문장",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷 keycap 1️⃣",
    "a  \n\n\t b   ",
    "   leading and trailing   ",
    " ",
    "\n",
    "",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != y: pass\r\n",
    "it's I'm we'll they've she'd you're DON'T",
    "Привет мир. Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया",
    "nbsp\u00a0em\u2003ideographic\u3000zero\u200bwidth",
    "https://example.com/path?q=1&r=2#frag !!!???...--- mixed123abc456",
]
CHATML_TEXTS = [
    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
    "special<|im_end|>inside<|im_start|> text <|endoftext|>",
]


def training_text() -> list[str]:
    # Enough real text (stdlib sources) for meaningful merges; the corpus adds accents, CJK and emoji.
    src = "".join(Path(m.__file__).read_text(encoding="utf-8") for m in (json, inspect))
    return src.splitlines() + CORPUS * 20


def train_bpe(path: Path, pre_tokenizer, normalizer=None, use_pre_tokenizer=None, whole_words=()) -> Path:
    """Train a byte-level BPE and save its tokenizer.json. `use_pre_tokenizer` replaces the training one afterwards
    (merges that then never apply, e.g. digit merges under single-digit splitting); `whole_words` are added to the
    vocab with no merges leading to them and switch on Llama-3's ignore_merges."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=CHATML,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(training_text(), trainer)
    if use_pre_tokenizer is not None:
        hf.pre_tokenizer = use_pre_tokenizer
    cfg = json.loads(hf.to_str())
    if whole_words:
        vocab = cfg["model"]["vocab"]
        for w in whole_words:
            vocab.setdefault(to_byte_level(w), len(vocab))
        cfg["model"]["ignore_merges"] = True
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return path


def to_byte_level(text: str) -> str:
    return "".join(BYTE_CHARS[b] for b in text.encode())


LLAMA3_SPLIT = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
)
WHOLE_WORDS = [" résumé", " coöperate", "Lorem"]
BYTE_LEVEL_VARIANTS = {
    "gpt2": dict(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "gpt2_prefix_space": dict(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True)),
    # SmolLM2's layout: single digits, then GPT-2's ByteLevel. Trained without the digit split, so that digit merges
    # exist but must not apply.
    "smollm2_digits": dict(
        pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False),
        use_pre_tokenizer=pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
    ),
    # Llama-3 HF layout: Split(regex) + ByteLevel(use_regex=False), and ignore_merges.
    "llama3_split": dict(pre_tokenizer=LLAMA3_SPLIT, whole_words=WHOLE_WORDS),
    "qwen2_nfc": dict(  # Qwen2 layout: NFC normalizer, single-digit Split regex
        pre_tokenizer=pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        normalizer=normalizers.NFC(),
    ),
}


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    return {name: train_bpe(root / name, **kw) for name, kw in BYTE_LEVEL_VARIANTS.items()}


def assert_matches_hf(ours, hf, texts, normalize=None):
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids) == (normalize(text) if normalize else text), text


# ----------------------------------------------------------------------------------------------- byte-level BPE


@pytest.mark.parametrize("variant", BYTE_LEVEL_VARIANTS)
def test_byte_level_bpe_matches_tokenizers(bpe_dirs, variant):
    d = bpe_dirs[variant]
    ours, hf = load_tokenizer(d), tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    assert isinstance(ours, BPETokenizer)
    norm = (lambda t: unicodedata.normalize("NFC", t)) if variant == "qwen2_nfc" else None
    if variant == "gpt2_prefix_space":  # the prefix space is added to the text, so decode gives it back
        norm = lambda t: "".join(  # noqa: E731
            p if k % 2 or p.startswith(" ") or not p else " " + p for k, p in enumerate(split_chatml(t))
        )
    assert_matches_hf(ours, hf, CORPUS + CHATML_TEXTS + [training_text()[0] * 3, "Lorem résumé"], norm)
    if variant == "llama3_split":  # ignore_merges: a pre-token that is itself in the vocab stays whole
        assert all(len(ours.encode(w)) == 1 for w in WHOLE_WORDS)
    if variant == "smollm2_digits":
        assert ours.encode("2024") == [ours.token_id(d) for d in "2024"]
    assert ours.vocab_size == hf.get_vocab_size()
    assert ours.token_id("<|im_end|>") == hf.token_to_id("<|im_end|>")
    assert ours.encode("<|im_start|>")[0] == hf.token_to_id("<|im_start|>")


def split_chatml(text):
    return regex.split("(" + "|".join(regex.escape(s) for s in CHATML) + ")", text)


def test_merges_as_strings_and_long_words(bpe_dirs, tmp_path):
    # Older tokenizer.json files store merges as "a b" strings instead of pairs.
    cfg = json.loads((bpe_dirs["gpt2"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert isinstance(cfg["model"]["merges"][0], list)
    cfg["model"]["merges"] = [" ".join(m) for m in cfg["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(cfg), encoding="utf-8")
    ours, hf = load_tokenizer(tmp_path), tokenizers.Tokenizer.from_file(str(bpe_dirs["gpt2"] / "tokenizer.json"))
    # Long single words (no spaces to split on) must not go quadratic; also a long mixed text.
    long_texts = ["好" * 50_000, "ab" * 50_000, "_" * 50_000, " " * 50_000 + "x", "\n".join(training_text()) * 2]
    t0 = time.perf_counter()
    assert_matches_hf(ours, hf, CORPUS + long_texts)
    assert time.perf_counter() - t0 < 20


def random_text():
    # Assigned characters only (Python's Unicode data): the libraries may disagree on characters newer than that.
    chars = st.characters(blacklist_categories=("Cs", "Cn"))
    return st.lists(
        st.one_of(st.text(chars, max_size=12), st.sampled_from(CHATML + [" ", "  ", "\n", "\t", "123", "'s", "é"])),
        max_size=12,
    ).map("".join)


@pytest.mark.parametrize("variant", ["gpt2", "smollm2_digits", "llama3_split"])
def test_byte_level_bpe_random_text(bpe_dirs, variant):
    d = bpe_dirs[variant]
    ours, hf = load_tokenizer(d), tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(random_text())
    def check(text):
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == text

    check()


# ------------------------------------------------------------------------------------------------ sentencepiece


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    # A tiny Llama-like model: BPE, byte fallback, no normalization, single digits; [INST] and [/INST] as control
    # tokens, as in Mistral v0.3.
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(training_text()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "tokenizer"),
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        control_symbols=["[INST]", "[/INST]"],
        character_coverage=0.9995,
        minloglevel=2,
    )
    return d


def hf_llama_from_sp(sp: spm.SentencePieceProcessor):
    """HF's (non-legacy) Llama tokenizer rebuilt from the pieces, as transformers' converter does: BPE with merges
    ordered by the merged piece's id, a "▁" prefix only at the start, specials split out, byte fallback."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    pieces = [p for p, i in vocab.items() if not sp.is_byte(i)]
    merges = sorted(
        ((a, b) for a in pieces for b in pieces if a + b in vocab),
        key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]),
    )
    hf = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    hf.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return hf


SP_SPECIAL_TEXTS = [
    "<s>hello</s>",
    "<s> hello world </s> and more",
    "[INST] What is 2+2? [/INST] It is 4.</s>",
    "[INST] hi[/INST]",
    "text before[INST]  two spaces after\n[/INST]\n",
    "<unk> stays unk",
]


def test_sentencepiece_matches_library_and_hf(sp_dir):
    ours = load_tokenizer(sp_dir)
    assert isinstance(ours, SentencePieceTokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    hf = hf_llama_from_sp(sp)
    for text in CORPUS:  # plain text: exactly the sentencepiece library
        assert ours.encode(text) == sp.encode(text), text
        assert ours.encode(text, bos=True) == [sp.bos_id()] + sp.encode(text)
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)) == text
    for text in CORPUS + SP_SPECIAL_TEXTS:  # with specials inside: HF's non-legacy Llama behaviour
        ids = ours.encode(text)
        if text[:1].isspace():  # HF's Metaspace then skips the "▁" prefix that sentencepiece (the reference) adds
            continue
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
        if not text.startswith("<unk>"):
            assert ours.decode(ids) == text, text
    assert ours.encode("[INST] hi [/INST]")[0] == sp.piece_to_id("[INST]")
    assert ours.bos_id == 1 and ours.eos_ids == [2] and ours.vocab_size == 600
    assert ours.token_id("</s>") == 2 and ours.token_id("no-such-piece") is None
    # No double BOS when the text already has it.
    assert ours.encode("<s>hi", bos=True) == ours.encode("<s>hi")


# ----------------------------------------------------------------------------------------------------- tiktoken


@pytest.fixture(scope="module")
def tiktoken_dir(bpe_dirs, tmp_path_factory):
    # A Llama-3 style rank file from the trained byte-level BPE: single bytes first, then tokens in merge order.
    cfg = json.loads((bpe_dirs["llama3_split"] / "tokenizer.json").read_text(encoding="utf-8"))
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in cfg["model"]["merges"]:
        ranks.setdefault(BPETokenizer._piece_bytes(a + b), len(ranks))
    d = tmp_path_factory.mktemp("tiktoken")
    (d / "original").mkdir()
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in ranks.items()]
    (d / "original" / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    return d


def test_tiktoken_matches_transformers_converter(tiktoken_dir):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ours = load_tokenizer(tiktoken_dir)
    assert isinstance(ours, TiktokenTokenizer)
    n = len(ours.ranks)
    # Llama-3's special ids: numbered after the ranks (128000 in the real model), 256 of them.
    assert ours.vocab_size == n + 256
    expect = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|start_header_id|>": 6, "<|end_header_id|>": 7}
    expect |= {"<|eot_id|>": 9, "<|reserved_special_token_247|>": 255}
    assert {s: ours.token_id(s) - n for s in expect} == expect
    assert ours.bos_id == n and set(ours.eos_ids) == {n + 1, n + 8, n + 9}

    specials = [None] * 256
    for s, i in ours.specials.items():
        specials[i - n] = s
    hf = TikTokenConverter(
        str(tiktoken_dir / "original" / "tokenizer.model"), pattern=LLAMA3_PATTERN, extra_special_tokens=specials
    ).converted()
    assert hf.token_to_id("<|eot_id|>") == n + 9
    texts = CORPUS + [
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "x<|reserved_special_token_5|>y <|eom_id|>",
    ]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False) == text, text
    assert ours.encode("hi", bos=True) == [n] + ours.encode("hi")
    # Runs longer than tiktoken's regex can take are cut (as in Meta's reference code); still round-trip.
    for text in [" " * 60_000 + "end", "好" * 60_000]:
        assert ours.decode(ours.encode(text)) == text


# ------------------------------------------------------------------------------------------ configs and errors


def test_bos_eos_from_configs(bpe_dirs, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dirs["gpt2"] / "tokenizer.json").read_bytes())
    plain = load_tokenizer(tmp_path)
    assert plain.bos_id is None  # GPT-2 style tokenizer.json adds no BOS
    assert plain.eos_ids == [0, 2]  # <|endoftext|>, <|im_end|> end generation even without configs
    assert plain.encode("hi", bos=True) == plain.encode("hi")

    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    )
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [7, 2]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 1
    assert tok.eos_ids == [2, 7, 9, 0]
    assert tok.encode("hi", bos=True) == [1] + plain.encode("hi")
    assert tok.encode("<|im_start|>hi", bos=True) == [1] + plain.encode("hi")


def test_llama3_hf_template_bos(bpe_dirs, tmp_path):
    # Llama-3's tokenizer.json adds BOS through a TemplateProcessing post-processor.
    cfg = json.loads((bpe_dirs["llama3_split"] / "tokenizer.json").read_text(encoding="utf-8"))
    cfg["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                ],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
            },
        ],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(cfg), encoding="utf-8")
    ours, hf = load_tokenizer(tmp_path), tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert ours.bos_id == 1
    assert ours.encode("hello world", bos=True) == hf.encode("hello world").ids


def test_load_errors(tmp_path, bpe_dirs):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="No usable tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a model\n\xff")
    with pytest.raises(TokenizerError, match="neither a sentencepiece model nor a tiktoken rank file"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(bad)
    # A non-byte-level tokenizer.json (Mistral's) with no tokenizer.model next to it is not usable.
    meta = tmp_path / "metaspace"
    meta.mkdir()
    cfg = json.loads((bpe_dirs["gpt2"] / "tokenizer.json").read_text(encoding="utf-8"))
    cfg["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (meta / "tokenizer.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(TokenizerError, match="No usable tokenizer"):
        load_tokenizer(meta)
    # A byte-level tokenizer.json with a pre-tokenizer we do not implement: the error names the file.
    cfg["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, {"type": "ByteLevel"}]}
    (meta / "tokenizer.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"metaspace/tokenizer\.json uses the unsupported pre-tokenizer"):
        load_tokenizer(meta)
    assert issubclass(TokenizerError, ValueError)


# --------------------------------------------------------------------------------------------------------- chat

# Excerpts of real templates: only the markers matter, the jinja is never run.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
)
MISTRAL_V02_TEMPLATE = "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
MISTRAL_V03_TEMPLATE = "{{- '[INST] ' + message['content'] + '[/INST]' }}"


def write_config(d: Path, **tokenizer_config):
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return d


def test_chat_prompt_conventions(tmp_path, bpe_dirs, sp_dir):
    tok = load_tokenizer(bpe_dirs["gpt2"])
    msg = "Summarize:\nthe text"
    chatml = write_config(tmp_path / "chatml", chat_template=SMOLLM2_TEMPLATE)
    assert chat_prompt(chatml, tok, msg) == f"<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n"
    llama3 = write_config(tmp_path / "llama3", chat_template=[{"name": "default", "template": LLAMA3_TEMPLATE}])
    assert chat_prompt(llama3, tok, msg) == (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{msg}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    mistral = write_config(tmp_path / "mistral", chat_template=MISTRAL_V02_TEMPLATE)
    assert chat_prompt(mistral, tok, msg) == f"[INST] {msg} [/INST]"
    mistral3 = write_config(tmp_path / "mistral3")
    (mistral3 / "chat_template.jinja").write_text(MISTRAL_V03_TEMPLATE, encoding="utf-8")
    assert chat_prompt(mistral3, tok, msg) == f"[INST] {msg}[/INST]"

    # No template: a sentencepiece Llama/Mistral checkpoint uses [INST]; a ChatML tokenizer uses ChatML.
    sp_tok = load_tokenizer(sp_dir)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert chat_prompt(bare, sp_tok, "hi") == "[INST] hi [/INST]"
    assert chat_prompt(bare, tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    with pytest.raises(TokenizerError, match="chat format"):
        chat_prompt(write_config(tmp_path / "gemma", chat_template="<start_of_turn>user\n"), tok, "hi")
    with pytest.raises(TokenizerError, match="chat format"):
        chat_prompt(tmp_path / "nothing", sp_tok, "hi")


# ------------------------------------------------------------------------------------------------- real SmolLM2


@pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file(),
    reason=f"{SMOLLM2}/tokenizer.json is missing; make it with `python scripts/prepare_test_model.py`",
)
def test_smollm2_tokenizer():
    ours = load_tokenizer(SMOLLM2)
    hf = tokenizers.Tokenizer.from_file(str(SMOLLM2 / "tokenizer.json"))
    assert isinstance(ours, BPETokenizer)
    assert_matches_hf(ours, hf, CORPUS + CHATML_TEXTS + ["\n".join(training_text()[:2000])])
    im_end = hf.token_to_id("<|im_end|>")
    assert im_end in ours.eos_ids
    assert ours.bos_id is None  # add_bos_token is false: the chat prompt starts with <|im_start|>
    prompt = chat_prompt(SMOLLM2, ours, "hi")
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.encode(prompt, bos=True) == hf.encode(prompt).ids

    # Ids only: SmolLM2's vocab lacks a few control bytes, which both drop, so such text does not round-trip.
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(random_text())
    def check(text):
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids

    check()
