"""Tokenizers of the Llama family behind one interface.

    encode(text, bos=None, eos=False) -> list[int]   (bos=None: what the original tokenizer does by default)
    decode(ids) -> str;  bos_id, eos_id, stop_ids, vocab_size, add_bos;  save(dir)
    load_tokenizer(dir) -> the tokenizer a checkpoint directory holds;  vocab_of(tok) -> Vocab (what writers store)

- SentencePiece: Llama 2's `tokenizer.model`.
- tiktoken: Llama 3's `tokenizer.model` (base64 rank lines + 256 specials added in code), and byte-level BPE
  from a GGUF file or a Hugging Face `tokenizer.json` (SmolLM2, Llama 3), rebuilt as a `tiktoken.Encoding`
  whose ranks are the token ids.
- SentencePiece-style BPE from a `tokenizer.json` (Llama 2, TinyLlama, Mistral with no `tokenizer.model`):
  Hugging Face's BPE written out in Python (merges by rank, byte fallback), cached per piece.
A Hugging Face directory's `tokenizer_config.json` sets BOS, EOS and add_bos_token whichever file holds the
vocabulary, and `generation_config.json` the ids that end generation (`stop_ids`).
"""
import base64
import binascii
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF's and SentencePiece's token types

# Llama 3's split regex (meta-llama/llama3 tokenizer.py)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's byte-level regex, and SmolLM2's: digits split one by one *before* it. One regex does both: a digit is
# its own piece, and trailing spaces before a digit end a piece as they would at the end of a string.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SMOLLM_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


def llama3_special_tokens(n_ranks=128000):
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
    return {name: n_ranks + i for i, name in enumerate(names)}


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes):
        import sentencepiece
        self.model_bytes = model_bytes
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self.add_bos = True  # Llama 2 prepends BOS
        self.stop_ids, self.hf_files = (self.eos_id,), {}

    def encode(self, text, bos=None, eos=False):
        ids = self.sp.encode(text)
        return ([self.bos_id] if (self.add_bos if bos is None else bos) else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def save(self, out_dir):
        (Path(out_dir) / "tokenizer.model").write_bytes(self.model_bytes)
        save_hf_files(self, out_dir)


class TiktokenTokenizer:
    """Byte-level BPE: `ranks` maps token bytes to ids, which are also the BPE merge priorities."""
    kind = "tiktoken"

    def __init__(self, ranks: dict, special: dict, pattern: str, bos_id: int, eos_id: int, add_bos: bool,
                 specials_in_text: bool, name="bpe", merges=None, token_types=None):
        import tiktoken
        self.ranks, self.special, self.pattern = ranks, special, pattern
        self.merges, self.token_types = merges, token_types  # as the file we read wrote them (vocab_of uses them)
        self.stop_ids, self.hf_files, self.from_json = (eos_id,), {}, False
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        # Meta's Llama 3 encodes "<|eot_id|>" in user text as plain text; Hugging Face BPE tokenizers parse it.
        self.specials_in_text = specials_in_text
        self.vocab_size = max([*ranks.values(), *special.values()]) + 1
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self._id_to_bytes = {i: b for b, i in ranks.items()} | {i: s.encode() for s, i in special.items()}

    def encode(self, text, bos=None, eos=False):
        if self.specials_in_text:
            ids = self.enc.encode(text, allowed_special="all")
        else:
            ids = self.enc.encode(text, disallowed_special=())
        return ([self.bos_id] if (self.add_bos if bos is None else bos) else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return b"".join(self._id_to_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def save(self, out_dir):
        out_dir = Path(out_dir)
        save_hf_files(self, out_dir)
        if self.from_json:  # tokenizer.json, as read, is the whole tokenizer
            return
        lines = (f"{base64.b64encode(b).decode()} {i}" for b, i in sorted(self.ranks.items(), key=lambda kv: kv[1]))
        (out_dir / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
        config = dict(special=self.special, pattern=self.pattern, bos_id=self.bos_id, eos_id=self.eos_id,
                      add_bos=self.add_bos, specials_in_text=self.specials_in_text)
        (out_dir / "tokenizer_tiktoken.json").write_text(json.dumps(config, indent=1))


class SentencePieceBPETokenizer:
    """SentencePiece-style BPE as a Hugging Face tokenizer.json holds it: spaces become "▁" (one is prepended),
    the text splits into characters, the adjacent pair with the lowest merge rank merges (leftmost first) until
    none is listed, and a character missing from the vocabulary becomes its UTF-8 bytes as <0xXX> tokens.

    No vocabulary entry holds "▁" after another character (checked), so no token crosses the start of a "▁" run
    and each run-led piece is merged on its own, once: encoding is a dictionary look-up per piece."""
    kind = "sentencepiece-bpe"

    def __init__(self, vocab, added: dict, prepend: str, byte_fallback: bool, ignore_merges: bool, split: bool):
        self.vocab, self.added, self.prepend = vocab, added, prepend  # prepend: legacy | always | first | never
        self.bos_id, self.eos_id, self.add_bos = vocab.bos_id, vocab.eos_id, vocab.add_bos
        self.vocab_size, self.byte_fallback, self.ignore_merges = len(vocab.tokens), byte_fallback, ignore_merges
        self.ids = {t: i for i, t in enumerate(vocab.tokens)}
        self.rank = {tuple(m.split(" ")): r for r, m in enumerate(vocab.merges)}
        self.unk_id = next((i for i, t in enumerate(vocab.token_types) if t == UNKNOWN), None)
        self.added_re = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
        if split:  # Metaspace's split: every "▁" starts a piece
            self.piece_re = re.compile("▁[^▁]*|[^▁]+")
        elif not any(re.search("[^▁]▁", t) for t in vocab.tokens):
            self.piece_re = re.compile("▁*[^▁]+|▁+")
        else:  # a token runs across a "▁": the text is one piece (slow, rare)
            self.piece_re = None
        self.cache = {}

    def _bpe(self, piece):
        if piece in self.cache:
            return self.cache[piece]
        if self.ignore_merges and piece in self.ids:
            return [self.ids[piece]]
        symbols = list(piece)
        while len(symbols) > 1:
            rank, i = min((self.rank.get(pair, len(self.rank)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
            if rank == len(self.rank):
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids = []
        for s in symbols:
            if s in self.ids:
                ids.append(self.ids[s])
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.ids for b in s.encode()):
                ids += [self.ids[f"<0x{b:02X}>"] for b in s.encode()]
            elif not (ids and ids[-1] == self.unk_id):  # unknown characters in a row fuse into one <unk>
                ids.append(self.unk_id)
        if len(self.cache) < 500_000:
            self.cache[piece] = ids
        return ids

    def _encode_segment(self, text, at_start):
        if self.prepend == "legacy":  # the Prepend("▁") + Replace(" ", "▁") normaliser of older exports
            text = "▁" + text.replace(" ", "▁") if text else text
        else:  # Metaspace: no "▁" is prepended to a text that already starts with one
            text = text.replace(" ", "▁")
            if (self.prepend == "always" or self.prepend == "first" and at_start) and text and text[0] != "▁":
                text = "▁" + text
        pieces = self.piece_re.findall(text) if self.piece_re else [text]
        return [i for piece in pieces for i in self._bpe(piece)]

    def encode(self, text, bos=None, eos=False):
        ids, start = [], 0
        for m in (self.added_re.finditer(text) if self.added_re else ()):  # added tokens match whole, first
            ids += self._encode_segment(text[start:m.start()], start == 0) + [self.added[m.group()]]
            start = m.end()
        ids += self._encode_segment(text[start:], start == 0)
        return ([self.bos_id] if (self.add_bos if bos is None else bos) else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        out, pending = [], bytearray()
        for i in ids:
            token, kind = self.vocab.tokens[int(i)], self.vocab.token_types[int(i)]
            if kind == BYTE:
                pending.append(int(token[3:5], 16))
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if kind != CONTROL:
                out.append(token)
        text = ("".join(out) + pending.decode("utf-8", errors="replace")).replace("▁", " ")
        return text[1:] if self.prepend != "never" and text.startswith(" ") else text

    def save(self, out_dir):
        save_hf_files(self, out_dir)


def read_tiktoken_ranks(path) -> dict:
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[binascii.a2b_base64(token)] = int(rank)
    return ranks


def is_tiktoken_file(path) -> bool:
    """Llama 3 ships a text file of `base64 rank` lines under the same name Llama 2 uses for SentencePiece."""
    head = Path(path).open("rb").read(256).split(b"\n")[0]
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head) is not None


def llama3_tokenizer(path):
    ranks = read_tiktoken_ranks(path)
    special = llama3_special_tokens(len(ranks))
    return TiktokenTokenizer(ranks, special, LLAMA3_PATTERN, bos_id=special["<|begin_of_text|>"],
                             eos_id=special["<|end_of_text|>"], add_bos=True, specials_in_text=False, name="llama3")


def _gpt2_byte_decoder():
    """GPT-2 writes each byte as a printable unicode character; this maps those characters back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def bpe_tokenizer_from_vocab(tokens, token_types, bos_id, eos_id, add_bos, pre, merges=None, pattern=None):
    """A GGUF / Hugging Face byte-level BPE vocab (ids in merge order) as a tiktoken tokenizer. The split regex is
    `pattern`, or llama.cpp's pre-tokenizer name `pre`'s."""
    byte_of = _gpt2_byte_decoder()
    ranks, special = {}, {}
    for i, (tok, typ) in enumerate(zip(tokens, token_types)):
        if typ in (3, 4):  # control / user-defined tokens are matched whole, never merged
            special[tok] = i
        else:
            ranks[bytes(byte_of[c] for c in tok)] = i
    pattern = pattern or PATTERN_OF_PRE.get(pre, GPT2_PATTERN)
    return TiktokenTokenizer(ranks, special, pattern, bos_id, eos_id, add_bos, specials_in_text=True, name=pre or "bpe",
                             merges=merges, token_types=list(token_types))


# ----------------------------------------------------------------------------- one vocabulary for every writer

PRE_OF_PATTERN = {SMOLLM_PATTERN: "smollm", LLAMA3_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt2"}  # llama.cpp's names
PATTERN_OF_PRE = {name: pattern for pattern, name in PRE_OF_PATTERN.items()}


@dataclass
class Vocab:
    """A tokenizer as the files that store one write it (tokenizer.json, GGUF), whatever class reads it here."""
    model: str                  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style, with scores)
    tokens: list[str]           # id -> text: GPT-2 byte characters for BPE; ▁-pieces and <0xXX> for SentencePiece
    token_types: list[int]      # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE
    scores: list[float] | None  # SentencePiece scores (higher merges first); None for BPE
    merges: list[str] | None    # "a b" BPE merges in priority order; None for SentencePiece
    pre: str | None             # llama.cpp's pre-tokenizer name for BPE ("smollm", "llama-bpe", "gpt2"); None if other
    bos_id: int
    eos_id: int
    add_bos: bool
    pattern: str | None = None  # BPE's split regex, for a tokenizer.json Split when llama.cpp has no name for it


def gpt2_byte_encoder() -> dict:
    """byte -> the printable character GPT-2's byte-level BPE writes for it."""
    return {b: c for c, b in _gpt2_byte_decoder().items()}


def two_token_splits(token, ids: dict) -> list:
    """Where `token` splits into two tokens of `ids`, ordered by (left id, right id): each such split is a merge."""
    return [k for _, _, k in sorted((ids[token[:k]], ids[token[k:]], k) for k in range(1, len(token))
                                    if token[:k] in ids and token[k:] in ids)]


def merges_from_ranks(ranks: dict) -> list:
    """tiktoken ranks -> Hugging Face merges ("a b", GPT-2 characters), as transformers converts Llama 3.

    tiktoken merges *any* adjacent pair whose concatenation is a token, lowest rank first; a merge list
    reproduces that only if it lists every split of a token into two tokens, ranked by the merged token's rank
    (one split per token is not enough: which split forms a token depends on its neighbours).
    """
    enc = gpt2_byte_encoder()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        for i in two_token_splits(token, ranks):
            merges.append("".join(enc[b] for b in token[:i]) + " " + "".join(enc[b] for b in token[i:]))
    return merges


def _sentencepiece_vocab(tok) -> Vocab:
    sp = tok.sp
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(tok.vocab_size)]
    return Vocab("llama", [sp.id_to_piece(i) for i in range(tok.vocab_size)], types,
                 [sp.get_score(i) for i in range(tok.vocab_size)], None, None, tok.bos_id, tok.eos_id, tok.add_bos)


def _tiktoken_vocab(tok) -> Vocab:
    enc = gpt2_byte_encoder()
    tokens, types = [f"[PAD{i}]" for i in range(tok.vocab_size)], [UNUSED] * tok.vocab_size
    for b, i in tok.ranks.items():
        tokens[i], types[i] = "".join(enc[c] for c in b), NORMAL
    for s, i in tok.special.items():
        tokens[i], types[i] = s, CONTROL
    if tok.token_types is not None:  # the types the file we read gave (control vs user-defined)
        types = list(tok.token_types)
    merges = list(tok.merges) if tok.merges is not None else merges_from_ranks(tok.ranks)
    return Vocab("gpt2", tokens, types, None, merges, PRE_OF_PATTERN.get(tok.pattern), tok.bos_id, tok.eos_id,
                 tok.add_bos, tok.pattern)


def vocab_of(tok) -> Vocab:
    """The vocabulary of any tokenizer of this module, as tokenizer.json and GGUF store it."""
    if tok.kind == "sentencepiece-bpe":  # read from a tokenizer.json: what the file said
        return replace(tok.vocab, bos_id=tok.bos_id, eos_id=tok.eos_id, add_bos=tok.add_bos)
    return {"sentencepiece": _sentencepiece_vocab, "tiktoken": _tiktoken_vocab}[tok.kind](tok)


def sentencepiece_merges(vocab: Vocab) -> list:
    """SentencePiece scores -> merges, as transformers' converter writes them: every split of a normal piece into
    two normal pieces, the higher-scored merged piece first (SentencePiece merges any pair that forms a piece)."""
    normal = {t: i for i, t in enumerate(vocab.tokens) if vocab.token_types[i] == NORMAL}
    merges = []
    for token, i in sorted(normal.items(), key=lambda kv: (-vocab.scores[kv[1]], kv[1])):
        merges += [f"{token[:k]} {token[k:]}" for k in two_token_splits(token, normal)]
    return merges


# ----------------------------------------------------------------------------- Hugging Face's tokenizer files

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.tiktoken", "tokenizer_tiktoken.json") + HF_FILES  # all save() writes


def _hf_config(directory) -> dict:
    """tokenizer_config.json if it is Hugging Face's (ours, of older checkpoints, has a 'pattern' key)."""
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    return {} if "pattern" in config else config


def _content(token):
    return token["content"] if isinstance(token, dict) else token


def _template_bos(post) -> str | None:
    """The special token a TemplateProcessing post-processor puts before a single text (Llama 3's BOS)."""
    if not post:
        return None
    if post["type"] == "Sequence":
        return next(filter(None, map(_template_bos, post["processors"])), None)
    first = post.get("single", [{}])[0] if post["type"] == "TemplateProcessing" else {}
    return first.get("SpecialToken", {}).get("id")


def apply_hf_config(tok, directory, token_id):
    """BOS, EOS, add_bos_token from tokenizer_config.json, stop_ids from generation_config.json; keeps the files
    (chat template and all) so that save() writes them again. token_id: token text -> id (None if absent)."""
    d, config = Path(directory), _hf_config(directory)
    for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id")):
        if config.get(key) is not None:
            i = token_id(_content(config[key]))
            if i is None:
                raise ValueError(f"{d / 'tokenizer_config.json'}: {key} {_content(config[key])!r} is not in the "
                                 f"vocabulary")
            setattr(tok, attr, i)
    if "add_bos_token" in config:
        tok.add_bos = bool(config["add_bos_token"])
    generation_file = d / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else {}
    stop = generation.get("eos_token_id", tok.eos_id)
    tok.stop_ids = tuple(stop) if isinstance(stop, list) else (stop,)
    if tok.eos_id is None:
        tok.eos_id = tok.stop_ids[0]
    tok.hf_files = {name: (d / name).read_text() for name in HF_FILES if (d / name).exists()
                    and (name != "tokenizer_config.json" or config)}
    return tok


def save_hf_files(tok, out_dir):
    """Write the Hugging Face tokenizer files a tokenizer was read from, unchanged."""
    for name, text in getattr(tok, "hf_files", {}).items():
        (Path(out_dir) / name).write_text(text)


def _bytelevel_pattern(pre) -> str:
    """The split regex of a byte-level pre-tokenizer that we can run as one tiktoken pattern."""
    steps = pre["pretokenizers"] if pre and pre["type"] == "Sequence" else [pre]
    kinds = [s["type"] if s else None for s in steps]
    byte_level = steps[-1] if kinds[-1] == "ByteLevel" else {}
    if byte_level and not byte_level.get("add_prefix_space"):
        regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return SMOLLM_PATTERN  # SmolLM2: each digit alone, then GPT-2's regex
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not regex and "Regex" in split["pattern"]
                and split["behavior"] == "Isolated" and not split.get("invert")):
            return split["pattern"]["Regex"]  # Llama 3: its own regex, then bytes to characters
    raise ValueError(f"tokenizer.json pre-tokenizer {json.dumps(pre)[:120]} is not supported: we read ByteLevel, "
                     f"Digits(individual) + ByteLevel, and Split(regex) + ByteLevel(no regex), as Llama models use")


def tokenizer_from_json(directory):
    """A Hugging Face tokenizer.json (byte-level or SentencePiece-style BPE) with its tokenizer_config.json."""
    d = Path(directory)
    spec, config = json.loads((d / "tokenizer.json").read_text()), _hf_config(d)
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{d / 'tokenizer.json'}: a {model.get('type')} model with these options is not supported; "
                         f"we read the BPE of Llama-family models (byte-level, or SentencePiece-style)")
    ids = dict(model["vocab"]) | {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    tokens = [None] * (max(ids.values()) + 1)
    for t, i in ids.items():
        tokens[i] = t
    if None in tokens:
        raise ValueError(f"{d / 'tokenizer.json'}: token id {tokens.index(None)} is missing from the vocabulary")
    types = [NORMAL] * len(tokens)
    for a in spec.get("added_tokens", []):
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    bos = config.get("bos_token") or _template_bos(spec.get("post_processor"))
    add_bos = config.get("add_bos_token", _template_bos(spec.get("post_processor")) is not None)
    bos_id, eos_id = ids.get(_content(bos)) if bos else None, ids.get(_content(config.get("eos_token")))
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    if spec.get("normalizer") and byte_level:
        raise ValueError(f"{d / 'tokenizer.json'}: normalizer {spec['normalizer']['type']} is not supported")
    if byte_level:
        pattern = _bytelevel_pattern(spec.get("pre_tokenizer"))
        merged = [ids.get(m.replace(" ", "")) for m in merges]
        if None in merged or any(a > b for a, b in zip(merged, merged[1:])):
            raise ValueError(f"{d / 'tokenizer.json'}: merges are not in token-id order, which tiktoken needs")
        tok = bpe_tokenizer_from_vocab(tokens, types, bos_id, eos_id, add_bos, None, merges, pattern=pattern)
        tok.from_json = True
        return apply_hf_config(tok, d, lambda t: ids.get(t))
    return apply_hf_config(_sentencepiece_bpe_from_json(spec, d, tokens, types, merges, bos_id, eos_id, add_bos),
                           d, lambda t: ids.get(t))


def _sentencepiece_bpe_from_json(spec, d, tokens, types, merges, bos_id, eos_id, add_bos):
    model, norm, pre = spec["model"], spec.get("normalizer"), spec.get("pre_tokenizer")
    legacy = dict(type="Sequence", normalizers=[dict(type="Prepend", prepend="▁"),
                                                dict(type="Replace", pattern={"String": " "}, content="▁")])
    if norm == legacy and pre is None:
        prepend, split = "legacy", False
    elif norm is None and pre and pre["type"] == "Metaspace" and pre.get("replacement") == "▁":
        # files written before `prepend_scheme` existed say add_prefix_space instead
        prepend = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        split = pre.get("split", True)
    else:
        raise ValueError(f"{d / 'tokenizer.json'}: normalizer {json.dumps(norm)[:80]} with pre-tokenizer "
                         f"{json.dumps(pre)[:80]} is not supported (we read Llama 2's: Prepend+Replace, or Metaspace)")
    if model.get("unk_token") in tokens:
        types[tokens.index(model["unk_token"])] = UNKNOWN
    if model.get("byte_fallback"):
        types = [BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else k for t, k in zip(tokens, types)]
    first_merge = {}
    for r, m in enumerate(merges):
        first_merge.setdefault(m.replace(" ", ""), r)
    scores = [-float(first_merge.get(t, 0)) for t in tokens]  # SentencePiece merges the highest score first
    vocab = Vocab("llama", tokens, types, scores, merges, None, bos_id, eos_id, add_bos)
    added = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    return SentencePieceBPETokenizer(vocab, added, prepend, bool(model.get("byte_fallback")),
                                     bool(model.get("ignore_merges")), split)


def load_tokenizer(directory):
    """The tokenizer in a checkpoint directory, or None if there is none. In order: ours (tokenizer.tiktoken),
    tokenizer.model (SentencePiece or Llama 3's tiktoken), Llama 3's original/tokenizer.model, tokenizer.json."""
    d = Path(directory)
    if (d / "tokenizer.tiktoken").exists():
        config_file = d / "tokenizer_tiktoken.json"  # older checkpoints called it tokenizer_config.json
        cfg = json.loads((config_file if config_file.exists() else d / "tokenizer_config.json").read_text())
        tok = TiktokenTokenizer(read_tiktoken_ranks(d / "tokenizer.tiktoken"), cfg["special"], cfg["pattern"],
                                cfg["bos_id"], cfg["eos_id"], cfg["add_bos"], cfg["specials_in_text"])
        return apply_hf_config(tok, d, lambda t: tok.special.get(t, tok.ranks.get(t.encode())))
    for path in (d / "tokenizer.model", d / "original" / "tokenizer.model"):
        if path.exists() and is_tiktoken_file(path):
            tok = llama3_tokenizer(path)
            return apply_hf_config(tok, d, lambda t: tok.special.get(t, tok.ranks.get(t.encode())))
        if path.exists():
            tok = SentencePieceTokenizer(path.read_bytes())
            return apply_hf_config(tok, d, lambda t: tok.sp.piece_to_id(t) if tok.sp.piece_to_id(t) != tok.sp.unk_id()
                                   or t == tok.sp.id_to_piece(tok.sp.unk_id()) else None)
    if (d / "tokenizer.json").exists():
        return tokenizer_from_json(d)
    return None
