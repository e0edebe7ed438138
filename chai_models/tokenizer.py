"""Tokenizers, written from scratch: byte-level BPE (GPT-2, OPT, SmolLM2, LLaMA-3) and sentencepiece (LLaMA-1/2).

    tok = load_tokenizer("weights/smollm2-135m-instruct")
    ids = tok.encode("Hello")                  # bos=None: the model's own add_bos default
    text = tok.decode(ids)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # text, ready for encode_chat
    ids = tok.encode_chat("Hi")               # template + encode without a second BOS
    stream = tok.stream_decoder(); pieces = [stream.push(i) for i in ids] + [stream.flush()]

Folder files read (HF formats): tokenizer.json (byte-level BPE), or vocab.json + merges.txt (GPT-2/OPT),
or tokenizer.model (sentencepiece, or Meta's LLaMA-3 tiktoken ranks: one "base64-token rank" per line);
plus tokenizer_config.json, special_tokens_map.json, generation_config.json, added_tokens.json and our
config.json when present.
Neither `tokenizers` nor `transformers` nor jinja2 is used here; they are test oracles only.
"""
from __future__ import annotations

import codecs
import json
import re as _re
from functools import lru_cache
from pathlib import Path

# `regex` gives exact Unicode classes (\p{L}, \p{N}) that the byte-level pre-tokenizers are defined with;
# the standard `re` module has no \p{...}.
import regex

from .errors import UserError

# GPT-2's byte-level split, shared by GPT-2, OPT, SmolLM2 and most byte-level BPE models
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# LLaMA-3's split: case-insensitive contractions, letters with one leading non-letter, numbers in groups of up to
# three digits, punctuation runs with their newlines, newline runs
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The HF pre_tokenizer that LLaMA-3's tokenizer.json carries: the split above, then bytes mapped to characters
LLAMA3_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

# End-of-turn markers of common chat formats: generation should stop on them as on EOS
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>")

# Meta's LLaMA-3 chat format (its reference ChatFormat) as a Jinja template, for tokenizers that carry none
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


class TokenizerError(UserError):
    """A tokenizer folder we cannot read, or text/template we cannot handle; the message says what to do."""


# ----------------------------------------------------------------------------------------------------
# byte <-> printable-character map of byte-level BPE


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """Each byte as one printable character: printable Latin-1 bytes as themselves, the rest shifted past 255.

    This is the alphabet GPT-2-style vocabularies are written in (a space is 'Ġ', a newline 'Ċ').
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


# ----------------------------------------------------------------------------------------------------
# pre-tokenizers: each maps a list of pieces to a finer list of pieces


def split_pieces(pieces: list[str], pattern, behavior: str = "Isolated") -> list[str]:
    """Splits every piece on the matches of pattern; `behavior` says where a match goes (HF's names)."""
    out = []
    for piece in pieces:
        parts, last = [], 0  # parts: (text, is_match)
        for m in pattern.finditer(piece):
            if m.start() == m.end():
                continue
            if m.start() > last:
                parts.append((piece[last:m.start()], False))
            parts.append((m.group(), True))
            last = m.end()
        if last < len(piece):
            parts.append((piece[last:], False))
        out.extend(_arrange(parts, behavior))
    return out


def _arrange(parts: list[tuple[str, bool]], behavior: str) -> list[str]:
    if behavior == "Isolated":
        return [p for p, _ in parts]
    if behavior == "Removed":
        return [p for p, is_match in parts if not is_match]
    out: list[str] = []
    for i, (p, is_match) in enumerate(parts):
        if behavior == "MergedWithPrevious" and is_match and out:
            out[-1] += p
        elif behavior == "MergedWithNext" and i > 0 and parts[i - 1][1] and out:
            out[-1] += p
        elif behavior == "Contiguous" and is_match and i > 0 and parts[i - 1][1]:
            out[-1] += p
        else:
            out.append(p)
    return out


def build_pre_tokenizer(spec: dict | None):
    """HF pre_tokenizer JSON -> a function list[str] -> list[str]. Unknown kinds are an error."""
    if spec is None:
        return lambda pieces: pieces
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [build_pre_tokenizer(s) for s in spec["pretokenizers"]]

        def run(pieces):
            for step in steps:
                pieces = step(pieces)
            return pieces
        return run
    if kind == "Digits":
        pat = regex.compile(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+")
        return lambda pieces: split_pieces(pieces, pat)
    if kind == "ByteLevel":
        return _byte_level_split(spec.get("add_prefix_space", False), spec.get("use_regex", True))
    if kind == "Split":
        pat = spec["pattern"]
        pat = regex.compile(pat["Regex"]) if "Regex" in pat else regex.compile(regex.escape(pat["String"]))
        behavior = spec.get("behavior", "Isolated")
        if spec.get("invert") and behavior != "Isolated":
            raise TokenizerError(f"Split pre-tokenizer with invert=True and behavior {behavior!r} is not supported")
        return lambda pieces: split_pieces(pieces, pat, behavior)
    raise TokenizerError(f"pre_tokenizer type {kind!r} is not supported by chai_models' byte-level BPE "
                         "(supported: Sequence, Digits, ByteLevel, Split)")


def _byte_level_split(add_prefix_space: bool, use_regex: bool):
    pat = regex.compile(GPT2_PATTERN)

    def run(pieces):
        if add_prefix_space:
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        if not use_regex:
            return pieces
        return [m for p in pieces for m in pat.findall(p)]
    return run


def build_normalizer(spec: dict | None):
    if spec is None:
        return lambda s: s
    import unicodedata

    kind = spec.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(kind, s)
    raise TokenizerError(f"normalizer {kind!r} is not supported by chai_models' byte-level BPE")


# ----------------------------------------------------------------------------------------------------
# tokenizer metadata shared by both kinds (special tokens, BOS/EOS, chat template)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); re-convert the model or restore the file") from e


def _content(tok) -> str | None:
    """A special token entry from tokenizer_config.json: a string or {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


class TokenizerInfo:
    """What tokenizer_config.json / special_tokens_map.json / generation_config.json / config.json say."""

    def __init__(self, folder: Path):
        self.config = _read_json(folder / "tokenizer_config.json")
        self.special_map = _read_json(folder / "special_tokens_map.json")
        self.generation = _read_json(folder / "generation_config.json")
        self.model = _read_json(folder / "config.json")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template

    def token(self, key: str) -> str | None:
        return _content(self.config.get(key)) or _content(self.special_map.get(key))

    def special_strings(self) -> set[str]:
        names = {self.token(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                                         "cls_token", "mask_token")}
        for src in (self.config, self.special_map):
            names.update(_content(t) for t in src.get("additional_special_tokens", []) or [])
        names.update(_content(t) for t in (self.config.get("added_tokens_decoder") or {}).values()
                     if isinstance(t, dict) and t.get("special", True))
        names.discard(None)
        return names

    def model_family(self) -> str | None:
        return self.model.get("family") or self.model.get("model_type")

    def eos_ids(self, lookup) -> list[int]:
        """EOS from every source, plus the chat format's end-of-turn token, in a stable order."""
        ids = []
        gen = self.generation.get("eos_token_id")
        ids += gen if isinstance(gen, list) else [gen]
        ids += self.model.get("eos_token_ids") or []
        model_eos = self.model.get("eos_token_id")
        ids += model_eos if isinstance(model_eos, list) else [model_eos]
        ids.append(lookup(self.token("eos_token")))
        for marker in END_OF_TURN:
            if self.chat_template and marker in self.chat_template:
                ids.append(lookup(marker))
        return list(dict.fromkeys(i for i in ids if i is not None))


def special_splitter(specials: list[str]):
    """A regex matching any of these tokens, longest first (so '<|im_start|>' beats '<|im')."""
    if not specials:
        return None
    return _re.compile("|".join(_re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def split_on_specials(text: str, splitter) -> list[tuple[str, bool]]:
    """[(chunk, is_special_token)] in order; specials occurring in the text are kept whole."""
    if splitter is None:
        return [(text, False)] if text else []
    out, last = [], 0
    for m in splitter.finditer(text):
        if m.start() > last:
            out.append((text[last:m.start()], False))
        out.append((m.group(), True))
        last = m.end()
    if last < len(text):
        out.append((text[last:], False))
    return out


# ----------------------------------------------------------------------------------------------------
# streaming decode


class StreamDecoder:
    """Turns token ids into text one at a time, holding back bytes of a UTF-8 character split across tokens.

    push(id) returns the text completed by this token ('' while a character is incomplete); flush() returns
    what is left at the end. The concatenation equals tok.decode(ids, skip_special).
    """

    def __init__(self, tok, skip_special: bool = False):
        self.tok = tok
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False

    def push(self, token_id: int) -> str:
        if self.skip_special and token_id in self.tok.special_ids:
            return ""
        data = self.tok.token_bytes(int(token_id))
        if not self._started and data and self.tok.strip_first_space and data[:1] == b" ":
            data = data[1:]  # sentencepiece drops the space it put in front of the text
        self._started = self._started or bool(data)
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------------------------------
# byte-level BPE


class BPETokenizer:
    """Byte-level BPE (GPT-2 family): pre-tokenize, map bytes to characters, merge by rank, look up ids.

    merges: the ranked merge list of HF files, or None for a tiktoken rank table, where the pair to merge is
    the one whose joined token has the lowest id (the vocabulary is ordered by merge rank).
    ignore_merges: a pre-token that is itself in the vocabulary is that one token, whatever the merges say
    (HF's `ignore_merges`; tiktoken always works this way).
    """

    strip_first_space = False

    def __init__(self, vocab: dict[str, int], merges: list | None, added: list[dict], pre_tokenizer, normalizer,
                 info: TokenizerInfo, add_bos: bool, unk: str | None = None, ignore_merges: bool = False):
        self.vocab = vocab
        self.ranks = None if merges is None else {_merge_pair(m): i for i, m in enumerate(merges)}
        self.ignore_merges = ignore_merges or merges is None
        self.added = {a["content"]: a["id"] for a in added}
        self.special_ids = {a["id"] for a in added if a.get("special", True)}
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.id_to_token.update({i: t for t, i in self.added.items()})
        self._added_ids = set(self.added.values())
        self.pre_tokenize, self.normalize = pre_tokenizer, normalizer
        self._splitter = special_splitter(list(self.added))
        self._cache: dict[str, list[int]] = {}
        self.unk_id = vocab.get(unk) if unk else None
        self.info, self.add_bos = info, add_bos
        self.bos_id = self.token_to_id(info.token("bos_token"))
        self.pad_id = self.token_to_id(info.token("pad_token"))
        self.eos_ids = info.eos_ids(self.token_to_id)
        self.chat_template = info.chat_template
        self.vocab_size = max(self.id_to_token) + 1

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        return self.added.get(token, self.vocab.get(token))

    # -- encode

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Text -> ids. bos None: prepend BOS when the model's tokenizer does (add_bos_token)."""
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        for chunk, is_special in split_on_specials(text, self._splitter):
            if is_special:
                ids.append(self.added[chunk])
                continue
            for piece in self.pre_tokenize([self.normalize(chunk)]):
                ids.extend(self._bpe(piece))
        return ids

    def _bpe(self, piece: str) -> list[int]:
        """One pre-token -> ids, by merging the lowest-ranked adjacent pair until none is left (cached)."""
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        table = byte_to_char()
        word = [table[b] for b in piece.encode("utf-8")]
        whole = "".join(word)
        if self.ignore_merges and whole in self.vocab:
            word = [whole]
        rank = self._pair_rank
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=rank)
            if rank(best) == _NO_RANK:
                break
            word = _merge(word, best)
        ids = [self._symbol_id(s) for s in word]
        if len(self._cache) > 200_000:  # bound memory on huge inputs
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def _pair_rank(self, pair: tuple[str, str]) -> float:
        if self.ranks is None:
            return self.vocab.get(pair[0] + pair[1], _NO_RANK)
        return self.ranks.get(pair, _NO_RANK)

    def _symbol_id(self, symbol: str) -> int:
        i = self.vocab.get(symbol, self.unk_id)
        if i is None:
            raise TokenizerError(f"symbol {symbol!r} is not in the vocabulary and it has no unk token; the "
                                 "vocabulary is not a complete byte-level one")
        return i

    # -- decode

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (added/special tokens: their text)."""
        tok = self.id_to_token.get(token_id)
        if tok is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if token_id in self._added_ids:
            return tok.encode("utf-8")
        table = char_to_byte()
        return bytes(table[c] for c in tok)

    def decode(self, ids, skip_special: bool = False) -> str:
        data = b"".join(self.token_bytes(int(i)) for i in ids
                        if not (skip_special and int(i) in self.special_ids))
        return data.decode("utf-8", errors="replace")

    def decode_token(self, token_id: int) -> str:
        """One token on its own (a partial UTF-8 character shows as U+FFFD; stream with stream_decoder)."""
        return self.token_bytes(int(token_id)).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    # -- chat

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, date_string: str | None = None) -> str:
        return render_chat(self, messages, add_generation_prompt, date_string)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """The chat as ids; the template writes BOS itself where the format has one, so encode adds none."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), bos=False)


_NO_RANK = float("inf")


def _merge_pair(m) -> tuple[str, str]:
    if isinstance(m, str):
        a, b = m.split(" ", 1)
        return a, b
    return tuple(m)


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    """Replaces every non-overlapping occurrence of pair, left to right, by the joined symbol."""
    a, b = pair
    out, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def bpe_from_tokenizer_json(folder: Path, info: TokenizerInfo) -> BPETokenizer:
    doc = _read_json(folder / "tokenizer.json")
    model = doc.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerError(f"{folder / 'tokenizer.json'} is not a byte-level BPE tokenizer (model "
                             f"{model.get('type')!r}); a sentencepiece model needs tokenizer.model beside it")
    add_bos = info.config.get("add_bos_token")
    if add_bos is None:  # HF fast tokenizers add BOS through a TemplateProcessing post-processor
        add_bos = _post_processor_adds(doc.get("post_processor"), info.token("bos_token"))
    return BPETokenizer(model["vocab"], model["merges"], doc.get("added_tokens", []),
                        build_pre_tokenizer(doc.get("pre_tokenizer")), build_normalizer(doc.get("normalizer")),
                        info, bool(add_bos), model.get("unk_token"), bool(model.get("ignore_merges", False)))


def _post_processor_adds(spec: dict | None, bos: str | None) -> bool:
    if not spec or bos is None:
        return False
    steps = spec.get("processors", [spec]) if spec.get("type") == "Sequence" else [spec]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            return first.get("SpecialToken", {}).get("id") == bos
    return False


def bpe_from_vocab_merges(folder: Path, info: TokenizerInfo) -> BPETokenizer:
    """GPT-2 / OPT folders: vocab.json + merges.txt; special tokens come from the config files."""
    vocab = _read_json(folder / "vocab.json")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    added_ids = {**_read_json(folder / "added_tokens.json")}
    for tid, entry in (info.config.get("added_tokens_decoder") or {}).items():
        added_ids[_content(entry)] = int(tid)
    specials = info.special_strings()
    for s in specials:
        if s not in added_ids and s in vocab:
            added_ids[s] = vocab[s]
    added = [{"id": i, "content": t, "special": t in specials} for t, i in added_ids.items()]
    add_bos = info.config.get("add_bos_token")
    if add_bos is None:
        # HF's OPT tokenizer prepends its BOS ('</s>', id 2) to every text; GPT-2's does not
        add_bos = info.model_family() == "opt"
    if info.model_family() == "opt" and info.token("bos_token") is None:
        info.config["bos_token"] = "</s>"
    return BPETokenizer(vocab, merges, added, _byte_level_split(bool(info.config.get("add_prefix_space")), True),
                        build_normalizer(None), info, bool(add_bos), info.token("unk_token"))


# ----------------------------------------------------------------------------------------------------
# Meta's LLaMA-3 tokenizer.model: tiktoken's rank table


def is_tiktoken_file(path: Path) -> bool:
    """Meta's LLaMA-3 tokenizer.model is text, one "base64-token rank" per line; sentencepiece's is a protobuf."""
    with open(path, "rb") as f:
        first = f.read(1024).split(b"\n", 1)[0]
    return _re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", first) is not None


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """token bytes -> rank; the ranks must be 0..N-1, each once, and every single byte must be a token."""
    import base64
    import binascii

    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}: line {n} is not 'base64-token rank' ({e}); the file is damaged, "
                                 "restore it from the model's download") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: the ranks are not 0..{len(ranks) - 1} with one token each; the file is "
                             "damaged, restore it from the model's download")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} single bytes (e.g. {missing[0]:#04x}) have no token, so some "
                             "text could not be encoded; this is not a complete byte-level rank table")
    return ranks


def llama3_special_tokens(tool_tokens: bool) -> list[str]:
    """LLaMA-3's 256 special tokens, in id order after the ranks. tool_tokens: LLaMA-3.1+ names (eom, python
    tag, fine-tune pad) for ids that LLaMA-3.0 leaves reserved."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
             9: "<|eot_id|>"}
    if tool_tokens:
        named.update({4: "<|finetune_right_pad_id|>", 8: "<|eom_id|>", 10: "<|python_tag|>"})
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def bpe_from_tiktoken(path: Path, info: TokenizerInfo) -> BPETokenizer:
    """A LLaMA-3 tokenizer from Meta's tokenizer.model; special tokens from tokenizer_config.json when it lists
    them, else LLaMA-3's (3.1+ names when params.json or config.json beside it says 3.1+ RoPE scaling)."""
    ranks = read_tiktoken(path)
    table = byte_to_char()
    vocab = {"".join(table[b] for b in token): rank for token, rank in ranks.items()}
    decoder = info.config.get("added_tokens_decoder") or {}
    if decoder:
        added = [{"id": int(i), "content": _content(t), "special": t.get("special", True) if isinstance(t, dict)
                  else True} for i, t in decoder.items()]
    else:
        params = _read_json(path.parent / "params.json")
        scaled = bool(params.get("use_scaled_rope")) or bool((info.model.get("rope_scaling") or {}).get("factor"))
        added = [{"id": len(vocab) + i, "content": t, "special": True}
                 for i, t in enumerate(llama3_special_tokens(scaled))]
    info.config.setdefault("bos_token", "<|begin_of_text|>")
    info.config.setdefault("eos_token", "<|end_of_text|>")
    if info.chat_template is None:
        info.chat_template = LLAMA3_CHAT_TEMPLATE
    add_bos = info.config.get("add_bos_token")
    return BPETokenizer(vocab, None, added, build_pre_tokenizer(LLAMA3_PRE_TOKENIZER), build_normalizer(None),
                        info, True if add_bos is None else bool(add_bos))


# ----------------------------------------------------------------------------------------------------
# sentencepiece


class SentencePieceTokenizer:
    """LLaMA-1/2 tokenizer.model through the sentencepiece package; control tokens in the text kept whole."""

    def __init__(self, path: Path, info: TokenizerInfo):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is neither a sentencepiece model nor a LLaMA-3 tiktoken rank table ({e}); "
                                 "restore it from the model's download (a Git LFS pointer is not the file)") from e
        n = self.sp.get_piece_size()
        # a model that puts a space in front of the text (add_dummy_prefix, LLaMA's default) drops it on decode
        self.strip_first_space = self.sp.encode("a", out_type=str)[0].startswith("\u2581")
        self.vocab_size = n
        self.special_ids = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._special = {self.sp.id_to_piece(i): i for i in self.special_ids}
        self._splitter = special_splitter(list(self._special))
        self.info = info
        add_bos = info.config.get("add_bos_token")
        self.add_bos = True if add_bos is None else bool(add_bos)  # LLaMA's default
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        pad = self.token_to_id(info.token("pad_token"))
        self.pad_id = pad if pad is not None else (self.sp.pad_id() if self.sp.pad_id() >= 0 else None)
        eos = [self.sp.eos_id()] if self.sp.eos_id() >= 0 else []
        self.eos_ids = list(dict.fromkeys(eos + info.eos_ids(self.token_to_id)))
        self.chat_template = info.chat_template

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        for chunk, is_special in split_on_specials(text, self._splitter):
            ids.extend([self._special[chunk]] if is_special else self.sp.encode(chunk))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):  # byte fallback pieces look like <0x0A>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def decode(self, ids, skip_special: bool = False) -> str:
        out, run = [], []
        for i in map(int, ids):
            if i in self.special_ids:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def decode_token(self, token_id: int) -> str:
        return self.token_bytes(int(token_id)).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, date_string: str | None = None) -> str:
        return render_chat(self, messages, add_generation_prompt, date_string)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), bos=False)


# ----------------------------------------------------------------------------------------------------
# chat templates, rendered natively for the formats we recognise in the stored template text


def chat_format(template: str | None) -> str:
    if not template:
        raise TokenizerError("this tokenizer has no chat template (a base model?); prompt it with raw text "
                             "(encode) instead of a chat")
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3.1" if "Cutting Knowledge Date" in template else "llama3"
    if "[INST]" in template:
        return "llama2"
    raise TokenizerError("unknown chat template format (known: ChatML, LLaMA-3, LLaMA-3.1+, LLaMA-2 [INST]); "
                         "format the prompt yourself and use raw mode (encode)")


def _messages(messages) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TokenizerError(f"chat message {m!r} needs 'role' and 'content'")
    return list(messages)


def chatml_default_system(template: str) -> str | None:
    """The system message a ChatML template inserts when the chat has none (SmolLM2 has one)."""
    m = _re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, _re.S)
    if not m or "message" in m.group(1):  # a slot filled from the messages, not a fixed default
        return None
    return m.group(1).replace("\\n", "\n")


def render_chatml(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    out = []
    default = chatml_default_system(template)
    if messages and messages[0]["role"] != "system" and default is not None:
        out.append(f"<|im_start|>system\n{default}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_llama3(bos: str, messages: list[dict], add_generation_prompt: bool) -> str:
    out = [bos]
    for m in messages:
        out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def llama31_system_header(template: str, date_string: str | None) -> str:
    """The lines a LLaMA-3.1+ template puts before the system message: its knowledge cut-off and today's date
    (the template's fixed default date, or the real date where it calls strftime_now, as transformers does)."""
    cutoff = _re.search(r"Cutting Knowledge Date: (.*?)(?:\\n|\n)", template)
    if "Today Date: " not in template:
        raise TokenizerError("this LLaMA-3.1-style chat template has a knowledge cut-off but no 'Today Date' line, a "
                             "layout chai_models does not know; format the prompt yourself and use raw mode (encode)")
    if date_string is None:
        strftime = _re.search(r"strftime_now\(\s*[\"']([^\"']+)[\"']\s*\)", template)
        fixed = _re.search(r"set date_string\s*=\s*[\"']([^\"']+)[\"']", template)
        if strftime:
            import datetime

            date_string = datetime.datetime.now().strftime(strftime.group(1))
        elif fixed:
            date_string = fixed.group(1)
        else:
            raise TokenizerError("this LLaMA-3.1+ chat template sets no default date; pass date_string")
    return f"Cutting Knowledge Date: {cutoff.group(1)}\nToday Date: {date_string}\n\n"


def render_llama31(template: str, bos: str, messages: list[dict], add_generation_prompt: bool,
                   date_string: str | None) -> str:
    """LLaMA-3.1+ for plain conversations: a system turn always (cut-off and date, then the system message),
    then the turns as in LLaMA-3. Tool calls and tool results need the template's tool branches: refused."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    for m in messages:
        if m["role"] in ("tool", "ipython") or "tool_calls" in m:
            raise TokenizerError(f"chat role {m['role']!r} (or tool calls) in a LLaMA-3.1+ chat: chai_models renders "
                                 "plain system/user/assistant chats only; format the prompt yourself and use raw "
                                 "mode (encode)")
    head = (f"{bos}<|start_header_id|>system<|end_header_id|>\n\n"
            f"{llama31_system_header(template, date_string)}{system}<|eot_id|>")
    return head + render_llama3("", messages, add_generation_prompt)


def render_llama2(bos: str, eos: str, messages: list[dict]) -> str:
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = []
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise TokenizerError("LLaMA-2 chats must alternate user/assistant/user/... (after an optional system)")
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            out.append(f"{bos}[INST] {content.strip()} [/INST]")
        else:
            out.append(f" {content.strip()} {eos}")
    return "".join(out)


def render_chat(tok, messages, add_generation_prompt: bool = True, date_string: str | None = None) -> str:
    """date_string: the date a LLaMA-3.1+ system turn shows (default: what the template itself would show)."""
    fmt = chat_format(tok.chat_template)
    messages = _messages(messages)
    bos, eos = tok.info.token("bos_token") or "", tok.info.token("eos_token") or ""
    if fmt == "chatml":
        return render_chatml(tok.chat_template, messages, add_generation_prompt)
    if fmt == "llama3":
        return render_llama3(bos, messages, add_generation_prompt)
    if fmt == "llama3.1":
        return render_llama31(tok.chat_template, bos, messages, add_generation_prompt, date_string)
    return render_llama2(bos, eos, messages)


# ----------------------------------------------------------------------------------------------------
# entry point


def load_tokenizer(folder) -> BPETokenizer | SentencePieceTokenizer:
    """The tokenizer stored in a converted checkpoint folder (or any HF tokenizer folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"{folder} is not a folder; pass the converted checkpoint folder "
                             "(e.g. weights/smollm2-135m-instruct)")
    info = TokenizerInfo(folder)
    if (folder / "tokenizer.json").exists():
        model = _read_json(folder / "tokenizer.json").get("model", {})
        if model.get("type") == "BPE" and not model.get("byte_fallback"):
            return bpe_from_tokenizer_json(folder, info)
    if (folder / "tokenizer.model").exists():
        if is_tiktoken_file(folder / "tokenizer.model"):
            return bpe_from_tiktoken(folder / "tokenizer.model", info)
        return SentencePieceTokenizer(folder / "tokenizer.model", info)
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return bpe_from_vocab_merges(folder, info)
    if (folder / "tokenizer.json").exists():
        return bpe_from_tokenizer_json(folder, info)  # raises with the reason
    raise TokenizerError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + "
                         "merges.txt); copy them from the source model into this folder")
