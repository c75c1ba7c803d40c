"""Where the data lives and how text becomes tokens and batches.

Every script takes --data-dir; without it we use ./data, then ../shared/data. Training text is tokenized
once into a flat uint32 `.bin` file (nanoGPT style) and memory-mapped afterwards. Training batches
(random windows of a token stream, or instruction records) are drawn so that a resumed run, and N
processes, see exactly what one uninterrupted process would. Calibration windows for the one-shot
methods follow the official Wanda/SparseGPT sampler.
"""
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from cli import UserError, atomic_write

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")



def resolve_data_dir(arg=None) -> Path:
    """--data-dir, else ./data, else ../shared/data; else stop with one line saying where the files go."""
    for candidate in ([arg] if arg else ["data", "../shared/data"]):
        if Path(candidate).is_dir():
            return Path(candidate)
    if arg and Path(arg).exists():
        raise UserError(f"--data-dir {arg} is a file; --data-dir is the directory that holds wikitext-2-raw/, "
                        f"text/, tasks/ and instruct/")
    if arg:
        raise UserError(f"--data-dir {arg} does not exist")
    raise UserError("no data directory: pass --data-dir, or put the data files (wikitext-2-raw/, text/, tasks/, "
                    "instruct/; see README.md 'Data') in ./data or ../shared/data")


def read_text(path) -> str:
    """A UTF-8 text file, newlines made "\\n" (as open() does); a byte that is not UTF-8 is one line naming the
    file and the byte's offset."""
    try:
        blob = Path(path).read_bytes()
    except OSError as e:  # a directory where the file should be, no permission to read it
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: byte {e.start} (0x{blob[e.start]:02x}) is not UTF-8 ({e.reason}); "
                        f"the file must be UTF-8 text: convert it (e.g. iconv -t utf-8) or remove that byte") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_lines(path) -> list[str]:
    """The lines of a UTF-8 text file (read_text), without their newlines, as iterating over open() splits them."""
    lines = read_text(path).split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def wikitext2_path(data_dir, split="test") -> Path:
    """The raw WikiText-2 file of a split (test or valid)."""
    return Path(data_dir) / "wikitext-2-raw" / f"wiki.{split}.raw"


def wikitext2_text(data_dir, split="test") -> str:
    """WikiText-2 raw as the Hugging Face rows joined with "\\n\\n" (a blank line " \\n" becomes an empty row)."""
    path = wikitext2_path(data_dir, split)
    if not path.exists():
        raise UserError(f"{path} not found: it is wiki.{split}.raw of wikitext-2-raw-v1; put it there or pass --data-dir")
    lines = read_text(path).splitlines(keepends=True)
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
            for n, line in enumerate(read_lines(p), 1):
                if line.strip():
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{p}:{n} is not a JSON object with a 'text' field") from None
                    if not isinstance(text, str):
                        raise UserError(f"{p}:{n}: 'text' is {type(text).__name__} {json.dumps(text)[:40]}, "
                                        f"not a string; a document is {{\"text\": \"...\"}}")
                    docs.append(text)
        else:
            docs.append(read_text(p))
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
    if not path.exists() or path.stat().st_size == 0:  # an empty cache file can't be memory-mapped
        ids = []
        for doc in read_documents(paths):
            ids.extend(tokenizer.encode(doc, bos=False, eos=True))
        if not ids:
            raise UserError(f"no documents in {', '.join(map(str, paths))}: the files hold no text; add some")
        atomic_write(path, np.asarray(ids, dtype=np.uint32).tofile)
    return np.memmap(path, dtype=np.uint32, mode="r")


# ----------------------------------------------------------------------------- training batches

class TokenBatches:
    """Random (x, y) windows of seq_len + 1 tokens from one token array, drawn by a seeded generator.

    Every rank draws the same world_size * batch_size offsets and keeps its own slice, so the ranks see
    disjoint windows and N processes see exactly the batch one process with N x batch_size would see."""

    def __init__(self, ids, seq_len, batch_size, seed, rank=0, world_size=1):
        if len(ids) < seq_len + 2:
            raise UserError(f"only {len(ids)} training tokens for --seq-len {seq_len}; add text or lower --seq-len")
        self.ids, self.seq_len, self.batch_size = ids, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next(self):
        n = self.world_size * self.batch_size
        starts = torch.randint(len(self.ids) - self.seq_len, (n,), generator=self.generator)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        rows = np.stack([np.asarray(self.ids[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        self.batches_drawn += 1
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.batches_drawn = state["batches_drawn"]


def alpaca_example(record, tokenizer, seq_len):
    """(tokens, targets) of one instruction record: Alpaca template, loss on the response tokens only."""
    template = ALPACA_PROMPT_INPUT if record.get("input") else ALPACA_PROMPT
    prompt = tokenizer.encode(template.format(instruction=record["instruction"], input=record.get("input", "")))
    response = tokenizer.encode(record["output"], bos=False, eos=True)
    ids = (prompt + response)[:seq_len + 1]
    targets = ([-100] * len(prompt) + response)[1:seq_len + 1]  # -100: no loss on the prompt
    return ids[:-1], targets


class InstructBatches:
    """Shuffled instruction records, padded on the right; epochs reshuffle with seed + epoch; resumes exactly.

    Like TokenBatches, every rank walks the same global order and keeps its own slice."""

    def __init__(self, records, tokenizer, seq_len, batch_size, seed, rank=0, world_size=1):
        self.records, self.tokenizer, self.seq_len = records, tokenizer, seq_len
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = None

    def _permutation(self):
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(len(self.records), generator=g).tolist()
        return self._order

    def next(self):
        n = self.batch_size * self.world_size
        if self.pos + n > len(self.records):  # drop the ragged tail of an epoch
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        order = self._permutation()[self.pos:self.pos + n]
        self.pos += n
        mine = order[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = [alpaca_example(self.records[i], self.tokenizer, self.seq_len) for i in mine]
        width = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), width), self.tokenizer.eos_id, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, targets) in enumerate(rows):
            x[r, :len(ids)], y[r, :len(targets)] = torch.tensor(ids), torch.tensor(targets)
        return x, y

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._order = state["epoch"], state["pos"], None


def read_instructions(path):
    records = []
    for n, line in enumerate(read_lines(path), 1):
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not a JSON line; fix or remove it") from None
            if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
                raise UserError(f"{path}:{n}: an instruction record needs 'instruction' and 'output' fields")
            wrong = next((k for k in ("instruction", "input", "output") if not isinstance(r.get(k, ""), str)), None)
            if wrong:
                raise UserError(f"{path}:{n}: '{wrong}' is {type(r[wrong]).__name__}, not a string")
            records.append(r)
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def training_batches(spec, data_dir, tokenizer, seq_len, batch_size, seed, rank=0, world_size=1):
    """spec: "text" (every file under <data-dir>/text), an instruction JSONL (Alpaca template, response-only
    loss; under --data-dir unless a path), or comma-separated text files (.jsonl with "text", or plain)."""
    data_dir = Path(data_dir)
    if spec == "text":
        paths = default_text_files(data_dir)
    else:
        names = spec.split(",")
        if not all(n.strip() for n in names):
            raise UserError(f"--data {spec!r} names an empty file name; pass a file, a comma list of files, or "
                            f"--data text")
        paths = [Path(p) if Path(p).exists() else data_dir / p for p in names]
        for p in paths:
            if not p.exists():
                raise UserError(f"--data {p} not found; pass an existing file (or --data text)")
            if not p.is_file():
                raise UserError(f"--data {p} is a directory; pass a file, a comma list of files, or --data text")
        if len(paths) == 1 and paths[0].suffix == ".jsonl":
            n, line = next(((n, x) for n, x in enumerate(read_lines(paths[0]), 1) if x.strip()), (0, "{}"))
            try:
                first = json.loads(line)  # the first record decides: instructions or documents
            except json.JSONDecodeError:
                raise UserError(f"{paths[0]}:{n} is not a JSON line; fix or remove it") from None
            if isinstance(first, dict) and "instruction" in first:
                records = read_instructions(paths[0])
                return InstructBatches(records, tokenizer, seq_len, batch_size, seed, rank, world_size)
    ids = tokenize_corpus(paths, tokenizer)
    return TokenBatches(ids, seq_len, batch_size, seed, rank, world_size)


# ----------------------------------------------------------------------------- calibration windows

def calibration_windows(tokenizer, paths, nsamples: int = 128, seq_len: int = 2048, seed: int = 0) -> torch.Tensor:
    """nsamples windows of seq_len tokens, as the official Wanda/SparseGPT get_c4: a random document
    longer than the window, then a random start in it (Python's random, seeded). Returns (nsamples, seq_len)."""
    docs = read_documents([Path(p) for p in paths])
    if not docs:
        raise UserError(f"no calibration documents in {', '.join(map(str, paths))}")
    rng = random.Random(seed)
    encoded = {}  # each document is tokenized once, with the tokenizer's default BOS (as `tokenizer(text)`)
    long_enough = None
    windows = []
    for _ in range(nsamples):
        for _tries in range(100_000):
            i = rng.randint(0, len(docs) - 1)
            if i not in encoded:
                encoded[i] = tokenizer.encode(docs[i])
            if len(encoded[i]) > seq_len:
                break
        else:
            long_enough = sum(len(tokenizer.encode(d)) > seq_len for d in docs)
            raise UserError(f"only {long_enough} of {len(docs)} calibration documents are longer than "
                            f"--calib-len {seq_len} tokens; lower --calib-len or add text")
        ids = encoded[i]
        j = rng.randint(0, len(ids) - seq_len - 1)
        windows.append(ids[j:j + seq_len])
    return torch.tensor(windows, dtype=torch.long)


def c4_paths(data_dir) -> "list[Path]":
    paths = sorted(Path(data_dir, "text").glob("redpajama-c4-rp*.jsonl"))
    if not paths:
        raise UserError(f"no C4 calibration text at {data_dir}/text/redpajama-c4-rp*.jsonl; pass --data-dir")
    return paths
