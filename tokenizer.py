"""Tokenizers for Hugging Face style checkpoint folders, without the `tokenizers`/`transformers` packages.

Three formats, one interface (`Tokenizer`):
  tokenizer.json   byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama-3 HF)  -> our own BPE below
  tokenizer.model  sentencepiece model (Llama-2, Mistral)               -> sentencepiece
  tokenizer.model  tiktoken rank file (Llama-3 original/)               -> tiktoken
"""
import base64
import functools
import heapq
import json
import re
import unicodedata
from pathlib import Path

import regex
import sentencepiece as spm
import tiktoken


class TokenizerError(ValueError):
    """A tokenizer problem the user can fix; the message is one sentence."""


# Generation stops on these too: chat models end a turn with them even when the configs list only the base eos.
_END_PIECES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>")


def _specials_regex(specials):
    # One capturing alternation, longest first, so `split` alternates text / special and the longest special wins.
    if not specials:
        return None
    return regex.compile("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


class Tokenizer:
    bos_id: int | None = None  # what HF's tokenizer prepends by default (None: it prepends nothing)
    eos_ids: list[int]  # every id that ends generation
    vocab_size: int
    specials: dict[str, int]  # special-token text -> id; split out of the text before encoding

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._encode(text)
        # A prompt that already starts with BOS as text (Llama-3's chat format) must not get a second one.
        if bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_id(self, piece: str) -> int | None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- byte-level BPE

# GPT-2's ByteLevel split, used when a ByteLevel pre-tokenizer has use_regex true.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_chars() -> list[str]:
    # GPT-2's reversible byte -> printable char map: vocab strings spell raw bytes with visible characters.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


BYTE_CHARS = _byte_chars()
BYTE_OF_CHAR = {c: b for b, c in enumerate(BYTE_CHARS)}
_TO_BYTE_CHARS = {b: c for b, c in enumerate(BYTE_CHARS)}  # str.translate table over latin-1 decoded bytes


def _isolate(pattern):
    # tokenizers' "Isolated" split: each match is a piece, and so is the text between matches.
    def split(s):
        out, pos = [], 0
        for m in pattern.finditer(s):
            if m.start() > pos:
                out.append(s[pos:m.start()])
            if m.end() > m.start():
                out.append(m.group())
            pos = m.end()
        if pos < len(s):
            out.append(s[pos:])
        return out

    return split


def _pre_tokenizer_steps(cfg, path) -> list:
    """tokenizer.json's pre_tokenizer as a list of str -> list[str] steps (byte mapping is done after them)."""
    if cfg is None:
        return []
    kind = cfg["type"]
    if kind == "Sequence":
        return [step for c in cfg["pretokenizers"] for step in _pre_tokenizer_steps(c, path)]
    if kind == "ByteLevel":
        steps = [lambda s: [s if s.startswith(" ") else " " + s]] if cfg.get("add_prefix_space") else []
        return steps + ([_isolate(regex.compile(GPT2_PATTERN))] if cfg.get("use_regex", True) else [])
    if kind == "Split" and cfg.get("behavior") == "Isolated" and not cfg.get("invert"):
        pat = cfg["pattern"]
        return [_isolate(regex.compile(pat["Regex"] if "Regex" in pat else regex.escape(pat["String"])))]
    if kind == "Digits":  # SmolLM2 splits numbers into single digits
        return [_isolate(regex.compile(r"\p{N}" if cfg.get("individual_digits") else r"\p{N}+"))]
    raise TokenizerError(f"{path} uses the unsupported pre-tokenizer {json.dumps(cfg)[:120]}.")


def _normalizer(cfg, path):
    if cfg is None:
        return None
    if cfg["type"] in ("NFC", "NFD", "NFKC", "NFKD"):  # Qwen2 uses NFC
        return lambda s: unicodedata.normalize(cfg["type"], s)
    if cfg["type"] == "Sequence":
        steps = [_normalizer(c, path) for c in cfg["normalizers"]]

        def run(s):
            for f in steps:
                s = f(s) if f else s
            return s

        return run
    raise TokenizerError(f"{path} uses the unsupported normalizer {cfg['type']}.")


def _is_byte_level(cfg) -> bool:
    return cfg.get("model", {}).get("type") == "BPE" and '"ByteLevel"' in json.dumps(cfg.get("pre_tokenizer"))


class BPETokenizer(Tokenizer):
    """Byte-level BPE read from tokenizer.json, matching the `tokenizers` library."""

    def __init__(self, cfg: dict, path="tokenizer.json"):
        model = cfg["model"]
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise TokenizerError(f"{path} uses subword prefixes or suffixes, which byte-level BPE does not have.")
        self.vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.ignore_merges = model.get("ignore_merges", False)  # Llama-3: a word that is a token is not re-merged
        self.unk = model.get("unk_token")
        # All added tokens are cut out of the text before BPE (as `tokenizers` does), special or not.
        self.specials = {t["content"]: t["id"] for t in cfg.get("added_tokens", [])}
        self.special_text = {i: s for s, i in self.specials.items()}  # they decode as their text
        self._split_specials = _specials_regex(self.specials)
        self.normalize = _normalizer(cfg.get("normalizer"), path)
        self.steps = _pre_tokenizer_steps(cfg.get("pre_tokenizer"), path)
        self.vocab_size = max([*self.vocab.values(), *self.specials.values()]) + 1
        self.bos_id = _template_bos(cfg.get("post_processor"))
        self.eos_ids = []
        self.cache: dict[str, list[int]] = {}

    @functools.cached_property
    def pieces(self) -> dict[int, str]:
        """id -> piece, made on the first decode: a decode converts only the ids it meets to bytes, so no
        process pays for a table of every token's bytes (half of a 49K vocabulary's loading time)."""
        return {i: p for p, i in self.vocab.items()}

    @staticmethod
    def _piece_bytes(piece: str) -> bytes:
        # Like the ByteLevel decoder: a piece with a char outside the byte map stands for its own UTF-8.
        try:
            return bytes(BYTE_OF_CHAR[c] for c in piece)
        except KeyError:
            return piece.encode()

    def _encode(self, text: str) -> list[int]:
        ids = []
        chunks = self._split_specials.split(text) if self._split_specials else [text]
        for k, chunk in enumerate(chunks):
            if k % 2:  # odd chunks are the captured specials
                ids.append(self.specials[chunk])
                continue
            if self.normalize:
                chunk = self.normalize(chunk)
            pieces = [chunk] if chunk else []
            for step in self.steps:
                pieces = [q for p in pieces for q in step(p)]
            for p in pieces:
                ids += self._word(p)
        return ids

    def _word(self, piece: str) -> list[int]:
        ids = self.cache.get(piece)
        if ids is None:
            ids = self._bpe(piece.encode().decode("latin-1").translate(_TO_BYTE_CHARS))
            if len(self.cache) >= 200_000:  # bound memory on huge inputs; common words come right back
                self.cache.clear()
            self.cache[piece] = ids
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Merge the lowest-ranked adjacent pair first (leftmost on ties), as `tokenizers` does.

        A heap over a linked list keeps this O(n log n), so a long word (a run of CJK text or
        punctuation without spaces) does not go quadratic."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        # As in `tokenizers`, a byte missing from the vocab (SmolLM2 lacks a few) becomes unk, or is dropped.
        parts = [c if c in self.vocab else self.unk for c in word]
        parts = [c for c in parts if c is not None]
        n, ranks = len(parts), self.ranks
        nxt, prv = list(range(1, n)) + [-1], list(range(-1, n - 1))
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((parts[i], parts[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            # An entry is stale once a neighbour merged first: the pair at i must still be the one ranked r.
            if parts[i] is None or j < 0 or ranks.get((parts[i], parts[j])) != r:
                continue
            parts[i], parts[j] = parts[i] + parts[j], None
            nxt[i] = nxt[j]
            if nxt[i] >= 0:
                prv[nxt[i]] = i
            for a, b in ((prv[i], i), (i, nxt[i])):
                if a >= 0 and b >= 0 and (r2 := ranks.get((parts[a], parts[b]))) is not None:
                    heapq.heappush(heap, (r2, a))
        return [self.vocab[p] for p in parts if p is not None]

    def decode(self, ids: list[int]) -> str:
        # Join bytes before decoding: a character may span tokens. Ids past the vocab (padded embeddings) are dropped.
        special, pieces = self.special_text, self.pieces
        data = (special[i].encode() if i in special else self._piece_bytes(pieces[i]) if i in pieces else b"" for i in ids)
        return b"".join(data).decode("utf-8", errors="replace")

    def token_id(self, piece: str) -> int | None:
        return self.specials.get(piece, self.vocab.get(piece))


def _template_bos(post) -> int | None:
    # HF adds BOS through a TemplateProcessing post-processor (Llama-3); GPT-2/Qwen2/SmolLM2 add nothing.
    for p in (post or {}).get("processors", [post] if post else []):
        if p.get("type") == "TemplateProcessing" and "SpecialToken" in p["single"][0]:
            return p["special_tokens"][p["single"][0]["SpecialToken"]["id"]]["ids"][0]
    return None


# ------------------------------------------------------------------------------------------------ sentencepiece

# A character no vocab has: sentencepiece cannot merge across it, so encoding it in front of a text
# and dropping its ids encodes the text without the dummy "▁" prefix.
_NO_PREFIX = "\U0010fffd"


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        # sentencepiece never makes control pieces (<s>, </s>, Mistral v3's [INST]) from text, so we split them out.
        self.specials = {
            self.sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        self._special_ids = set(self.specials.values())
        self._split_specials = _specials_regex(self.specials)
        self._no_prefix_len = len(self.sp.encode(_NO_PREFIX))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = [self.sp.eos_id()] if self.sp.eos_id() >= 0 else []

    def _encode(self, text: str) -> list[int]:
        ids = []
        chunks = self._split_specials.split(text) if self._split_specials else [text]
        for k, chunk in enumerate(chunks):
            if k % 2:
                ids.append(self.specials[chunk])
            elif chunk:
                # Like HF's (non-legacy) Llama/Mistral tokenizers: the dummy "▁" prefix goes only at the start of the
                # text, not after each special token, so "[INST] hi" gives [INST] ▁hi rather than [INST] ▁ ▁hi.
                ids += self.sp.encode(chunk) if k == 0 else self.sp.encode(_NO_PREFIX + chunk)[self._no_prefix_len:]
        return ids

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        out, start = [], 0
        for k in range(len(ids) + 1):
            if k < len(ids) and ids[k] not in self._special_ids:
                continue
            if start < k:
                s = self.sp.decode(ids[start:k])
                # sentencepiece drops a leading "▁" as the dummy prefix, but text after a special token has none.
                if start > 0 and self.sp.id_to_piece(ids[start]).startswith("▁"):
                    s = " " + s
                out.append(s)
            if k < len(ids):
                out.append(self.sp.id_to_piece(ids[k]))
            start = k + 1
        return "".join(out)

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if i != self.sp.unk_id() or piece == self.sp.id_to_piece(i) else None


# ----------------------------------------------------------------------------------------------------- tiktoken

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama-3.1's names, as in its HF tokenizer.json (3.0 called some of them reserved; the ids are the same).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]  # fmt: skip


_MAX_RUN = 25_000
# The lookbehinds anchor each try at the start of a run, which keeps the scan linear (`re`'s \s is str.isspace, as
# in Meta's code).
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{_MAX_RUN + 1},}}|(?<!\S)\S{{{_MAX_RUN + 1},}}")


def _read_ranks(path: Path) -> dict[bytes, int] | None:
    """The tiktoken rank file (base64 token, space, rank per line), or None if the file is not one."""
    ranks = {}
    try:
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:  # binary sentencepiece protobuf: lines do not split into base64 + int
        return None
    return ranks or None


class TiktokenTokenizer(Tokenizer):
    def __init__(self, ranks: dict[bytes, int]):
        n = max(ranks.values()) + 1  # the 256 specials are numbered right after the ranks
        self.specials = {s: n + i for i, s in enumerate(LLAMA3_SPECIALS)}
        self.ranks = ranks
        self.enc = tiktoken.Encoding(
            "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.specials
        )
        self.vocab_size = self.enc.n_vocab
        self.bos_id = self.specials["<|begin_of_text|>"]
        self.eos_ids = []

    def _encode(self, text: str) -> list[int]:
        # tiktoken's regex overflows its backtracking stack on very long runs of spaces: like Meta's reference
        # tokenizer, cut runs of spaces / non-spaces into 25k-char pieces (any other text is encoded whole).
        ids, start = [], 0
        for m in _LONG_RUN.finditer(text):
            for cut in range(m.start() + _MAX_RUN, m.end(), _MAX_RUN):
                ids += self.enc.encode(text[start:cut], allowed_special="all")
                start = cut
        return ids + self.enc.encode(text[start:], allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([i for i in ids if 0 <= i < self.vocab_size])

    def token_id(self, piece: str) -> int | None:
        return self.specials.get(piece, self.ranks.get(piece.encode()))


# ------------------------------------------------------------------------------------------------------ loading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}).") from None


def _load_model_file(path: Path) -> Tokenizer:
    ranks = _read_ranks(path)
    if ranks:
        return TiktokenTokenizer(ranks)
    try:
        return SentencePieceTokenizer(path)
    except (RuntimeError, OSError):
        raise TokenizerError(f"{path} is neither a sentencepiece model nor a tiktoken rank file.") from None


def load_tokenizer(ckpt_dir) -> Tokenizer:
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise TokenizerError(f"Checkpoint folder {d} does not exist.")
    tok = None
    if (d / "tokenizer.json").is_file():
        cfg = _read_json(d / "tokenizer.json")
        if _is_byte_level(cfg):
            tok = BPETokenizer(cfg, d / "tokenizer.json")
    if tok is None:  # e.g. Mistral ships a non-byte-level tokenizer.json next to its tokenizer.model
        for path in (d / "tokenizer.model", d / "original" / "tokenizer.model"):
            if path.is_file():
                tok = _load_model_file(path)
                break
    if tok is None:
        raise TokenizerError(
            f"No usable tokenizer in {d}: expected a byte-level BPE tokenizer.json or a tokenizer.model."
        )
    _apply_configs(tok, d)
    return tok


def _ids(v) -> list[int]:  # config.json / generation_config.json give an int or a list
    return [v] if isinstance(v, int) else [i for i in v if isinstance(i, int)] if isinstance(v, list) else []


def _apply_configs(tok: Tokenizer, d: Path) -> None:
    """BOS and EOS ids from tokenizer_config.json, config.json and generation_config.json over the format's defaults."""
    tc, cfg, gen = (_read_json(d / f) for f in ("tokenizer_config.json", "config.json", "generation_config.json"))

    def piece_id(v):  # tokenizer_config stores a token as a string or as {"content": ...}
        v = v.get("content") if isinstance(v, dict) else v
        return tok.token_id(v) if isinstance(v, str) else None

    add_bos = tc.get("add_bos_token", tok.bos_id is not None)
    bos = piece_id(tc.get("bos_token"))
    if bos is None:
        bos = _ids(cfg.get("bos_token_id"))[0] if _ids(cfg.get("bos_token_id")) else tok.bos_id
    tok.bos_id = bos if add_bos else None

    eos = [piece_id(tc.get("eos_token")), *_ids(cfg.get("eos_token_id")), *_ids(gen.get("eos_token_id"))]
    eos += tok.eos_ids + [tok.specials[p] for p in _END_PIECES if p in tok.specials]
    tok.eos_ids = list(dict.fromkeys(i for i in eos if i is not None))


# --------------------------------------------------------------------------------------------------------- chat


def _chat_template(d: Path) -> str:
    t = _read_json(d / "tokenizer_config.json").get("chat_template") or ""
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        t = "\n".join(x.get("template", "") for x in t)
    if (d / "chat_template.jinja").is_file():  # newer transformers save the template in its own file
        t += (d / "chat_template.jinja").read_text(encoding="utf-8")
    return t


def chat_prompt(ckpt_dir, tokenizer: Tokenizer, user_message: str) -> str:
    """One user turn in the checkpoint's chat format, ending where the assistant's answer begins.

    The convention is recognised from the chat template's text (never executed); without a template,
    from the tokenizer's special tokens or config.json's model_type."""
    d = Path(ckpt_dir)
    t = _chat_template(d)
    if not t:
        if "<|start_header_id|>" in tokenizer.specials:
            t = "<|start_header_id|>"
        elif "<|im_start|>" in tokenizer.specials:
            t = "<|im_start|>"
        elif _read_json(d / "config.json").get("model_type") in ("llama", "mistral") and isinstance(
            tokenizer, SentencePieceTokenizer
        ):
            t = "[INST]"
    if "<|im_start|>" in t:
        return f"<|im_start|>user\n{user_message}<|im_end|>\n<|im_start|>assistant\n"
    if "<|start_header_id|>" in t:
        return (
            f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user_message}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    if "[INST]" in t:
        # Mistral v0.3's template puts '[/INST]' right after the message; Llama-2 and Mistral v0.1-0.2 ' [/INST]'.
        close = "[/INST]" if regex.search(r"""['"]\[/INST\]""", t) else " [/INST]"
        return f"[INST] {user_message}{close}"  # the caller adds BOS with encode(bos=True)
    raise TokenizerError(f"Cannot tell the chat format of {d}: expected a ChatML, Llama-3 or [INST] chat template.")
