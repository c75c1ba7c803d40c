"""Where the data lives and how text becomes tokens.

Every script takes --data-dir; without it we use ./data, then ../shared/data. Training text is tokenized
once into a flat uint32 `.bin` file (nanoGPT style) and memory-mapped afterwards.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from model import UserError


def resolve_data_dir(arg=None) -> Path:
    """--data-dir, else ./data, else ../shared/data; else stop with one line saying where the files go."""
    for candidate in ([arg] if arg else ["data", "../shared/data"]):
        if Path(candidate).is_dir():
            return Path(candidate)
    if arg:
        raise UserError(f"--data-dir {arg} does not exist")
    raise UserError("no data directory: pass --data-dir, or put the data files (wikitext-2-raw/, text/, tasks/, "
                    "instruct/; see README.md 'Data') in ./data or ../shared/data")


def wikitext2_text(data_dir, split="test") -> str:
    """WikiText-2 raw as the Hugging Face rows joined with "\\n\\n" (a blank line " \\n" becomes an empty row)."""
    path = Path(data_dir) / "wikitext-2-raw" / f"wiki.{split}.raw"
    if not path.exists():
        raise UserError(f"{path} not found: it is wiki.{split}.raw of wikitext-2-raw-v1; put it there or pass --data-dir")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return "\n\n".join(line if line.strip() else "" for line in lines)


def default_text_files(data_dir) -> list[Path]:
    files = sorted((Path(data_dir) / "text").glob("*.jsonl")) + sorted((Path(data_dir) / "text").glob("*.txt"))
    if not files:
        raise UserError(f"no training text in {Path(data_dir) / 'text'}: put .jsonl (field 'text') or .txt files there")
    return files


def read_documents(paths) -> list[str]:
    """Documents from .jsonl files (one {"text": ...} per line) or plain text files (one document each)."""
    docs = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} not found")
        if p.suffix == ".jsonl":
            with p.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            docs.append(json.loads(line)["text"])
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise UserError(f"{p}:{n} is not a JSON object with a 'text' field") from None
        else:
            docs.append(p.read_text(encoding="utf-8"))
    return docs


def _tokenizer_id(tokenizer) -> str:
    """A fingerprint of the tokenizer, so a cache made with one tokenizer is never read with another."""
    probe = "Hello world! 123 ünïcode\n\n  tabs\t<|endoftext|>"
    return json.dumps([type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.encode(probe, bos=False)])


def tokenize_corpus(paths, tokenizer, cache_dir="cache") -> np.ndarray:
    """All documents as one uint32 token stream (each document followed by EOS), cached as a .bin file."""
    paths = [Path(p) for p in paths]
    key = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.exists()])
    digest = hashlib.sha256((key + _tokenizer_id(tokenizer)).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tokens-{digest}.bin"
    if not path.exists():
        ids = []
        for doc in read_documents(paths):
            ids.extend(tokenizer.encode(doc, bos=False, eos=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        np.asarray(ids, dtype=np.uint32).tofile(tmp)
        os.replace(tmp, path)
    return np.memmap(path, dtype=np.uint32, mode="r")
