"""Tokenizers of the Llama family behind one interface.

    encode(text, bos=None, eos=False) -> list[int]   (bos=None: what the original tokenizer does by default)
    decode(ids) -> str;  bos_id, eos_id, vocab_size, add_bos;  save(dir)

- SentencePiece: Llama 2's `tokenizer.model`.
- tiktoken: Llama 3's `tokenizer.model` (base64 rank lines + 256 specials added in code), and the byte-level
  BPE stored inside a GGUF file (SmolLM2), rebuilt as a `tiktoken.Encoding` whose ranks are the token ids.
"""
import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path

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

    def encode(self, text, bos=None, eos=False):
        ids = self.sp.encode(text)
        return ([self.bos_id] if (self.add_bos if bos is None else bos) else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def save(self, out_dir):
        (Path(out_dir) / "tokenizer.model").write_bytes(self.model_bytes)


class TiktokenTokenizer:
    """Byte-level BPE: `ranks` maps token bytes to ids, which are also the BPE merge priorities."""
    kind = "tiktoken"

    def __init__(self, ranks: dict, special: dict, pattern: str, bos_id: int, eos_id: int, add_bos: bool,
                 specials_in_text: bool, name="bpe", merges=None, token_types=None):
        import tiktoken
        self.ranks, self.special, self.pattern = ranks, special, pattern
        self.merges, self.token_types = merges, token_types  # as the file we read wrote them (vocab_of uses them)
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
        lines = (f"{base64.b64encode(b).decode()} {i}" for b, i in sorted(self.ranks.items(), key=lambda kv: kv[1]))
        (out_dir / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
        config = dict(special=self.special, pattern=self.pattern, bos_id=self.bos_id, eos_id=self.eos_id,
                      add_bos=self.add_bos, specials_in_text=self.specials_in_text)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


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


def bpe_tokenizer_from_vocab(tokens, token_types, bos_id, eos_id, add_bos, pre, merges=None):
    """A GGUF / Hugging Face byte-level BPE vocab (ids in merge order) as a tiktoken tokenizer."""
    byte_of = _gpt2_byte_decoder()
    ranks, special = {}, {}
    for i, (tok, typ) in enumerate(zip(tokens, token_types)):
        if typ in (3, 4):  # control / user-defined tokens are matched whole, never merged
            special[tok] = i
        else:
            ranks[bytes(byte_of[c] for c in tok)] = i
    pattern = {"smollm": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN}.get(pre, GPT2_PATTERN)
    return TiktokenTokenizer(ranks, special, pattern, bos_id, eos_id, add_bos, specials_in_text=True, name=pre,
                             merges=merges, token_types=list(token_types))


def load_tokenizer(directory):
    """The tokenizer saved in a checkpoint directory, or None if there is none."""
    d = Path(directory)
    if (d / "tokenizer.tiktoken").exists():
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        return TiktokenTokenizer(read_tiktoken_ranks(d / "tokenizer.tiktoken"), cfg["special"], cfg["pattern"],
                                 cfg["bos_id"], cfg["eos_id"], cfg["add_bos"], cfg["specials_in_text"])
    if (d / "tokenizer.model").exists():
        path = d / "tokenizer.model"
        return llama3_tokenizer(path) if is_tiktoken_file(path) else SentencePieceTokenizer(path.read_bytes())
    return None


# ----------------------------------------------------------------------------- one vocabulary for every writer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF's and SentencePiece's token types
PRE_OF_PATTERN = {SMOLLM_PATTERN: "smollm", LLAMA3_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt2"}  # llama.cpp's names


@dataclass
class Vocab:
    """A tokenizer as the files that store one write it (tokenizer.json, GGUF), whatever class reads it here."""
    model: str                  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style, with scores)
    tokens: list                # id -> text: GPT-2 byte characters for BPE; ▁-pieces and <0xXX> for SentencePiece
    token_types: list           # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE
    scores: list | None         # SentencePiece scores (higher merges first); None for BPE
    merges: list | None         # "a b" BPE merges in priority order; None for SentencePiece
    pre: str | None             # llama.cpp's pre-tokenizer name for BPE ("smollm", "llama-bpe", "gpt2"); None if other
    bos_id: int
    eos_id: int
    add_bos: bool


def gpt2_byte_encoder() -> dict:
    """byte -> the printable character GPT-2's byte-level BPE writes for it."""
    return {b: c for c, b in _gpt2_byte_decoder().items()}


def merges_from_ranks(ranks: dict) -> list:
    """tiktoken ranks -> Hugging Face merges ("a b", GPT-2 characters), as transformers converts Llama 3.

    tiktoken merges *any* adjacent pair whose concatenation is a token, lowest rank first; a merge list
    reproduces that only if it lists every split of a token into two tokens, ranked by the merged token's rank
    (one split per token is not enough: which split forms a token depends on its neighbours).
    """
    enc = gpt2_byte_encoder()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        for _, _, i in sorted(splits):
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
                 tok.add_bos)


def vocab_of(tok) -> Vocab:
    """The vocabulary of any tokenizer of this module, as tokenizer.json and GGUF store it."""
    if hasattr(tok, "vocab"):  # read from a tokenizer.json or GGUF: keep what the file said
        return tok.vocab
    return {"sentencepiece": _sentencepiece_vocab, "tiktoken": _tiktoken_vocab}[tok.kind](tok)


def sentencepiece_merges(vocab: Vocab) -> list:
    """SentencePiece scores -> merges, as transformers' converter writes them: every split of a normal piece into
    two normal pieces, the higher-scored merged piece first (SentencePiece merges any pair that forms a piece)."""
    normal = {t: i for i, t in enumerate(vocab.tokens) if vocab.token_types[i] == NORMAL}
    merges = []
    for token, i in sorted(normal.items(), key=lambda kv: (-vocab.scores[kv[1]], kv[1])):
        splits = [(normal[token[:k]], normal[token[k:]], k) for k in range(1, len(token))
                  if token[:k] in normal and token[k:] in normal]
        merges += [f"{token[:k]} {token[k:]}" for _, _, k in sorted(splits)]
    return merges


def tokenizer_json(vocab: Vocab) -> dict:
    """Hugging Face's tokenizer.json for a vocabulary: the `tokenizers` library gives our ids with it."""
    special = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                    special=vocab.token_types[i] != USER_DEFINED)
               for i, t in enumerate(vocab.tokens) if vocab.token_types[i] in (CONTROL, USER_DEFINED, UNKNOWN)]
    in_model = {t: i for i, t in enumerate(vocab.tokens)}  # specials too: `tokenizers` misnumbers them otherwise
    bos = vocab.tokens[vocab.bos_id]
    post = None if not vocab.add_bos else dict(
        type="TemplateProcessing", single=[{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        pair=[{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
              {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        special_tokens={bos: dict(id=bos, ids=[vocab.bos_id], tokens=[bos])})
    if vocab.model == "gpt2":
        byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True)
        pre = {"gpt2": byte_level,
               "smollm": dict(type="Sequence", pretokenizers=[dict(type="Digits", individual_digits=True), byte_level]),
               "llama-bpe": dict(type="Sequence", pretokenizers=[
                   dict(type="Split", pattern={"Regex": LLAMA3_PATTERN}, behavior="Isolated", invert=False),
                   byte_level | dict(use_regex=False)])}.get(vocab.pre)
        if pre is None:
            raise ValueError(f"no tokenizer.json pre-tokenizer for '{vocab.pre}' (known: gpt2, smollm, llama-bpe)")
        model = dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
                     fuse_unk=False, byte_fallback=False, ignore_merges=True, vocab=in_model,
                     merges=[m.split(" ") for m in vocab.merges])  # ignore_merges: tiktoken's whole-piece lookup
        return dict(version="1.0", truncation=None, padding=None, added_tokens=special, normalizer=None,
                    pre_tokenizer=pre, post_processor=post, decoder=byte_level, model=model)
    merges = vocab.merges if vocab.merges is not None else sentencepiece_merges(vocab)
    unk = next((t for t, typ in zip(vocab.tokens, vocab.token_types) if typ == UNKNOWN), None)
    model = dict(type="BPE", dropout=None, unk_token=unk, continuing_subword_prefix=None, end_of_word_suffix=None,
                 fuse_unk=True, byte_fallback=True, ignore_merges=False, vocab=in_model,
                 merges=[m.split(" ") for m in merges])
    decoder = dict(type="Sequence", decoders=[
        dict(type="Replace", pattern={"String": "▁"}, content=" "), dict(type="ByteFallback"), dict(type="Fuse"),
        dict(type="Strip", content=" ", start=1, stop=0)])
    # Prepend + Replace as a normaliser, not Metaspace: Metaspace adds no "▁" to a text that starts with a space,
    # SentencePiece does
    normalizer = dict(type="Sequence", normalizers=[dict(type="Prepend", prepend="▁"),
                                                    dict(type="Replace", pattern={"String": " "}, content="▁")])
    return dict(version="1.0", truncation=None, padding=None, added_tokens=special, normalizer=normalizer,
                pre_tokenizer=None, post_processor=post, decoder=decoder, model=model)
