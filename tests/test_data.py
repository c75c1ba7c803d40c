"""Data location, the WikiText-2 rows, and the tokenized-corpus cache."""
import os

import numpy as np
import pytest

from data import read_documents, resolve_data_dir, tokenize_corpus, wikitext2_text
from model import UserError
from tokenizer import load_tokenizer


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
