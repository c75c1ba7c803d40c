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
                 specials_in_text: bool, name="bpe"):
        import tiktoken
        self.ranks, self.special, self.pattern = ranks, special, pattern
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


def bpe_tokenizer_from_vocab(tokens, token_types, bos_id, eos_id, add_bos, pre):
    """A GGUF / Hugging Face byte-level BPE vocab (ids in merge order) as a tiktoken tokenizer."""
    byte_of = _gpt2_byte_decoder()
    ranks, special = {}, {}
    for i, (tok, typ) in enumerate(zip(tokens, token_types)):
        if typ in (3, 4):  # control / user-defined tokens are matched whole, never merged
            special[tok] = i
        else:
            ranks[bytes(byte_of[c] for c in tok)] = i
    pattern = {"smollm": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN}.get(pre, GPT2_PATTERN)
    return TiktokenTokenizer(ranks, special, pattern, bos_id, eos_id, add_bos, specials_in_text=True, name=pre)


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
