"""data.py: where the data lives, the WikiText-2 rows, the tokenized-corpus cache, the training batches
(token windows and instruction records) that resume exactly and shard by rank, and the calibration windows
of the official Wanda/SparseGPT C4 sampler."""
import json
import os

import numpy as np
import pytest
import torch

import data
from cli import UserError
from data import InstructBatches, TokenBatches, read_documents, resolve_data_dir, tokenize_corpus, wikitext2_text
from tokenizer import GPT2_PATTERN, TiktokenTokenizer, load_tokenizer


def byte_tokenizer():
    """One token per byte, BOS 256, EOS 257: a tokenizer that needs no files."""
    return TiktokenTokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256, "</s>": 257}, GPT2_PATTERN,
                             bos_id=256, eos_id=257, add_bos=True, specials_in_text=False, name="bytes")


def test_data_dir_resolution(tmp_path, monkeypatch):
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    with pytest.raises(UserError, match="does not exist"):
        resolve_data_dir(str(tmp_path / "nope"))
    monkeypatch.chdir(tmp_path)  # neither ./data nor ../shared/data here
    with pytest.raises(UserError, match="pass --data-dir"):
        resolve_data_dir(None)
    (tmp_path / "data").mkdir()
    assert resolve_data_dir(None) == tmp_path.joinpath("data").relative_to(tmp_path)


def test_wikitext2_rows_give_the_literatures_token_count(data_dir):
    """shared/data/README.md: Llama 2 tokenizer + one BOS = 341,469 tokens (83 windows of 4096, 166 of 2048)."""
    text = wikitext2_text(data_dir)
    assert text.startswith("\n\n = Robert Boulter = \n")  # first row "" then the heading row
    ids = load_tokenizer(data_dir / "tokenizers" / "llama2").encode(text)
    assert len(ids) == 341469 and len(ids) // 4096 == 83 and len(ids) // 2048 == 166


def test_tokenize_corpus_is_cached_and_separates_documents(data_dir, tmp_path):
    tok = load_tokenizer(data_dir / "tokenizers" / "llama2")
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "Hello world."}\n\n{"text": "Second doc"}\n')
    ids = tokenize_corpus([src], tok, cache_dir=tmp_path / "cache")
    assert ids.dtype == np.uint32
    assert ids.tolist() == tok.encode("Hello world.", bos=False, eos=True) + tok.encode("Second doc", bos=False, eos=True)
    (bin_file,) = (tmp_path / "cache").glob("*.bin")
    stamp = os.stat(bin_file).st_mtime_ns
    assert tokenize_corpus([src], tok, cache_dir=tmp_path / "cache").tolist() == ids.tolist()
    assert os.stat(bin_file).st_mtime_ns == stamp  # read back, not tokenized again
    src.write_text('{"text": "changed"}\n')  # a changed file is a new cache entry
    assert tokenize_corpus([src], tok, cache_dir=tmp_path / "cache").tolist() == tok.encode("changed", bos=False, eos=True)


def test_malformed_documents_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        read_documents([bad])
    with pytest.raises(UserError, match="not found"):
        read_documents([tmp_path / "missing.jsonl"])


# ----------------------------------------------------------------------------- training batches

def test_token_batches_resume_exactly_and_shard_by_rank():
    ids = np.arange(10_000, dtype=np.uint32)
    full = TokenBatches(ids, seq_len=16, batch_size=4, seed=3)
    for _ in range(5):
        full.next()
    state = full.state_dict()
    x1, y1 = full.next()
    resumed = TokenBatches(ids, seq_len=16, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    x2, y2 = resumed.next()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.long and torch.equal(y1[:, :-1], x1[:, 1:])  # y is x shifted by one
    # two ranks of batch 2 see exactly one process's batch of 4, split in halves
    one = TokenBatches(ids, 16, 4, seed=9).next()[0]
    r0 = TokenBatches(ids, 16, 2, seed=9, rank=0, world_size=2).next()[0]
    r1 = TokenBatches(ids, 16, 2, seed=9, rank=1, world_size=2).next()[0]
    assert torch.equal(torch.cat([r0, r1]), one)


def test_instruction_batches_mask_the_prompt_and_resume():
    tok = byte_tokenizer()
    records = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "ctx", "output": f"{i} " * (i + 1)}
               for i in range(10)]
    x, y = data.alpaca_example(records[1], tok, seq_len=512)
    prompt = tok.encode(data.ALPACA_PROMPT.format(instruction="Say 1."))
    assert x == prompt + tok.encode("1 1 ", bos=False) and len(y) == len(x)
    assert y == [-100] * (len(prompt) - 1) + tok.encode("1 1 ", bos=False, eos=True)  # response + EOS only
    a = InstructBatches(records, tok, 256, 3, seed=0)
    b = InstructBatches(records, tok, 256, 3, seed=0)
    for _ in range(4):  # past an epoch boundary
        a.next()
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert (ya != -100).any() and (ya[xa == 257] == -100).all()  # padding never carries loss


def test_a_malformed_instruction_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "instr.jsonl"
    good = '{"instruction": "Say hi.", "output": "hi"}\n'
    path.write_text(good + "\n" + '{"instruction": "cut off\n')
    with pytest.raises(UserError, match=r"^.*instr\.jsonl:3 is not a JSON line; fix or remove it$"):
        data.read_instructions(path)
    path.write_text(good + '{"instruction": "no output"}\n')
    with pytest.raises(UserError, match=r"instr\.jsonl:2: an instruction record needs 'instruction' and 'output'"):
        data.read_instructions(path)
    path.write_text(good + '["a list"]\n')
    with pytest.raises(UserError, match=r"instr\.jsonl:2: an instruction record needs"):
        data.read_instructions(path)
    path.write_text("\n\n")
    with pytest.raises(UserError, match="holds no records"):
        data.read_instructions(path)
    path.write_text("{oops\n" + good)  # through --data: the first line decides the kind, and is checked too
    with pytest.raises(UserError, match=r"instr\.jsonl:1 is not a JSON line"):
        data.training_batches(str(path), tmp_path, byte_tokenizer(), 16, 2, seed=0)
    path.write_text(good + "{oops\n")
    with pytest.raises(UserError, match=r"instr\.jsonl:2 is not a JSON line"):
        data.training_batches(str(path), tmp_path, byte_tokenizer(), 16, 2, seed=0)


def test_training_batches_pick_instructions_or_token_windows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the token cache goes to ./cache
    tok = byte_tokenizer()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("plain text, long enough for a few windows. " * 5)
    (tmp_path / "docs.jsonl").write_text('{"text": "a document with a text field, long enough."}\n' * 3)
    (tmp_path / "instr.jsonl").write_text(
        "".join(f'{{"instruction": "Say {i}.", "output": "{i}"}}\n' for i in range(4)))
    instruct = data.training_batches("instr.jsonl", tmp_path, tok, 32, 2, seed=0)  # under --data-dir
    assert isinstance(instruct, InstructBatches) and len(instruct.records) == 4 and instruct.seq_len == 32
    for spec in ("text", str(tmp_path / "docs.jsonl"), f"{tmp_path / 'docs.jsonl'},{tmp_path / 'text' / 'a.txt'}"):
        batches = data.training_batches(spec, tmp_path, tok, 16, 2, seed=0, rank=1, world_size=2)
        assert isinstance(batches, TokenBatches), spec
        assert (batches.seq_len, batches.batch_size, batches.rank, batches.world_size) == (16, 2, 1, 2)
        x, y = batches.next()
        assert x.shape == y.shape == (2, 16)
    assert data.training_batches("text", tmp_path, tok, 16, 2, seed=0).ids.tolist() == tok.encode(
        (tmp_path / "text" / "a.txt").read_text(), bos=False, eos=True)
    with pytest.raises(UserError, match="--data .*missing.jsonl not found"):
        data.training_batches("missing.jsonl", tmp_path, tok, 16, 2, seed=0)


# ----------------------------------------------------------------------------- calibration windows

def test_calibration_windows_follow_the_official_sampler(tmp_path):
    class ByteTokenizer:
        add_bos = False

        def encode(self, text, bos=None, eos=False):
            return list(text.encode())

    docs = ["short", "x" * 10, "abcdefghijklmnopqrstuvwxyz" * 3, "0123456789" * 5]
    path = tmp_path / "c4.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    calib = data.calibration_windows(ByteTokenizer(), [path], nsamples=6, seq_len=20, seed=0)
    assert calib.shape == (6, 20)
    for row in calib.tolist():  # every window is a slice of a document longer than the window
        s = bytes(row).decode()
        assert any(s in d and len(d) > 20 for d in docs)
    assert torch.equal(calib, data.calibration_windows(ByteTokenizer(), [path], nsamples=6, seq_len=20, seed=0))
    assert not torch.equal(calib, data.calibration_windows(ByteTokenizer(), [path], nsamples=6, seq_len=20, seed=1))
    with pytest.raises(UserError, match="longer than"):
        data.calibration_windows(ByteTokenizer(), [path], nsamples=2, seq_len=100)


def test_c4_paths_names_the_files_it_wants(tmp_path):
    with pytest.raises(UserError, match=r"no C4 calibration text at .*redpajama-c4-rp\*\.jsonl"):
        data.c4_paths(tmp_path)
    (tmp_path / "text").mkdir()
    for name in ("redpajama-c4-rp2.jsonl", "redpajama-c4-rp1.jsonl", "other.jsonl"):
        (tmp_path / "text" / name).write_text("")
    assert [p.name for p in data.c4_paths(tmp_path)] == ["redpajama-c4-rp1.jsonl", "redpajama-c4-rp2.jsonl"]


# ----------------------------------------------------------------------------- bad input: one line each

def test_a_byte_that_is_not_utf8_is_named_by_file_and_offset(tmp_path):
    """A task, WikiText-2 or --data file with a Latin-1 byte: the file and the byte's offset, never a traceback."""
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_bytes(b" = T = \n caf\xe9 \n")
    with pytest.raises(UserError, match=r"wiki\.test\.raw: byte 12 \(0xe9\) is not UTF-8"):
        wikitext2_text(tmp_path)
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"docs\.jsonl: byte 25 \(0xff\) is not UTF-8"):
        read_documents([docs])
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"abc\x80")
    with pytest.raises(UserError, match=r"plain\.txt: byte 3 \(0x80\) is not UTF-8"):
        data.training_batches(str(plain), tmp_path, byte_tokenizer(), 16, 2, seed=0)
    instr = tmp_path / "instr.jsonl"
    instr.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xc3(", "output": "b"}\n')
    with pytest.raises(UserError, match=r"instr\.jsonl: byte 53 \(0xc3\) is not UTF-8"):
        data.training_batches(str(instr), tmp_path, byte_tokenizer(), 16, 2, seed=0)
    # \r\n and \r read as open() reads them: the rows of WikiText-2 are unchanged
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_bytes(b" = T = \r\n \r\n a \r b \n")
    assert wikitext2_text(tmp_path) == " = T = \n" + "\n\n" + "" + "\n\n" + " a \n" + "\n\n" + " b \n"


def test_empty_or_wrongly_typed_training_text_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the token cache goes to ./cache
    tok = byte_tokenizer()
    with pytest.raises(UserError, match="--data '' names an empty file name"):
        data.training_batches("", tmp_path, tok, 16, 2, seed=0)
    (tmp_path / "a.txt").write_text("some text " * 10)
    with pytest.raises(UserError, match="names an empty file name"):
        data.training_batches(f"{tmp_path / 'a.txt'},", tmp_path, tok, 16, 2, seed=0)
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="--data .*sub is a directory"):
        data.training_batches(str(tmp_path / "sub"), tmp_path, tok, 16, 2, seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match=r"no documents in .*empty\.jsonl"):
        data.training_batches(str(empty), tmp_path, tok, 16, 2, seed=0)
    assert not list((tmp_path / "cache").glob("*.bin"))  # nothing cached that could not be read back
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no documents in"):
        data.training_batches(str(tmp_path / "blank.jsonl"), tmp_path, tok, 16, 2, seed=0)
    number = tmp_path / "number.jsonl"
    number.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(UserError, match=r"number\.jsonl:2: 'text' is int 5, not a string"):
        data.training_batches(str(number), tmp_path, tok, 16, 2, seed=0)
    instr = tmp_path / "instr.jsonl"
    instr.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 7}\n')
    with pytest.raises(UserError, match=r"instr\.jsonl:2: 'output' is int, not a string"):
        data.training_batches(str(instr), tmp_path, tok, 16, 2, seed=0)


def test_data_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match=r"--data-dir .*f is a file; --data-dir is the directory"):
        resolve_data_dir(str(tmp_path / "f"))


def test_a_data_file_that_cannot_be_read_is_one_line(tmp_path):
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(UserError, match=r"cannot read .*wiki\.test\.raw: Is a directory"):
        wikitext2_text(tmp_path)
