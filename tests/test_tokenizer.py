"""Our tokenizers against the libraries used directly (SentencePiece, tiktoken) and Hugging Face's tokenizer."""
import json

import pytest

from checkpoint import fetch_smollm2
from hf import tokenizer_json
from tokenizer import LLAMA3_PATTERN, SentencePieceTokenizer, llama3_tokenizer, load_tokenizer, vocab_of


def sample_texts(data_dir):
    wiki = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()[:60000]
    docs = [json.loads(line)["text"] for name in ("redpajama-github1", "redpajama-arxiv1", "redpajama-c4-rp1")
            for line in (data_dir / "text" / f"{name}.jsonl").read_text().splitlines()[:15]]
    return [wiki, *docs, "a  1 x 12  345\n\n  7 héllo wörld 😀 It's", "  \n\t 3.14159 $1,000 <|endoftext|>"]


def test_llama2_equals_sentencepiece(data_dir, tmp_path):
    import sentencepiece
    path = data_dir / "tokenizers" / "llama2" / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tok = load_tokenizer(path.parent)
    assert isinstance(tok, SentencePieceTokenizer) and (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    for text in sample_texts(data_dir):
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.encode(text, bos=False, eos=True) == sp.encode(text) + [2]
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("Hello world") == tok.encode("Hello world")


def test_llama3_equals_tiktoken_with_meta_specials(data_dir, tmp_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    path = data_dir / "tokenizers" / "llama3" / "tokenizer.model"
    ranks = load_tiktoken_bpe(str(path))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    specials += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    ref = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})
    tok = llama3_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (128000, 128001, 128256)
    assert tok.encode("<|eot_id|>", bos=False) != [128009]  # Meta encodes specials in user text as plain text
    assert ref.encode("<|eot_id|>", allowed_special="all") == [128009]
    for text in sample_texts(data_dir):
        assert tok.encode(text) == [128000] + ref.encode(text, disallowed_special=())
    assert tok.decode(tok.encode("Héllo\n\nwörld", bos=False)) == "Héllo\n\nwörld"
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("x = 12345;  y") == tok.encode("x = 12345;  y")


def test_smollm2_gguf_bpe_equals_huggingface(smollm2, data_dir, tmp_path):
    """The BPE inside the GGUF, rebuilt as tiktoken, gives Hugging Face's ids on real text.

    The reference is transformers' tokenizer of the same GGUF with SmolLM2's own pre-tokenizer (digits split
    one by one, then GPT-2's byte-level regex: SmolLM2's tokenizer.json and llama.cpp's `smollm`); transformers'
    GGUF converter drops the digit split, which only changes runs of spaces before a digit.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers
    _, tok = smollm2
    path = fetch_smollm2()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (hf.bos_token_id, hf.eos_token_id, False)
    n = 0
    for text in sample_texts(data_dir):
        ids = tok.encode(text)
        assert ids == hf.encode(text)
        assert tok.decode(ids) == text
        n += len(ids)
    assert n > 30000
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("x = 12345;  y <|im_start|>") == tok.encode("x = 12345;  y <|im_start|>")


@pytest.mark.parametrize("name", ["llama2", "llama3", "smollm2"])
def test_vocab_as_tokenizer_json_gives_our_ids_in_the_tokenizers_library(name, data_dir, request):
    """vocab_of -> tokenizer.json -> Hugging Face's `tokenizers` reproduces our ids (what export_hf and GGUF write)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = (request.getfixturevalue("smollm2")[1] if name == "smollm2"
           else load_tokenizer(data_dir / "tokenizers" / name))
    vocab = vocab_of(tok)
    assert len(vocab.tokens) == len(vocab.token_types) == tok.vocab_size
    assert (vocab.bos_id, vocab.eos_id, vocab.add_bos) == (tok.bos_id, tok.eos_id, tok.add_bos)
    assert (vocab.model, vocab.pre) == {"llama2": ("llama", None), "llama3": ("gpt2", "llama-bpe"),
                                        "smollm2": ("gpt2", "smollm")}[name]
    if name == "llama3":
        assert len(vocab.merges) == 280147  # as many as Meta-Llama-3's own tokenizer.json
    ref = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(vocab)))
    for text in sample_texts(data_dir):
        if name == "llama2":
            text = text.replace("<|endoftext|>", "")  # "<s>"-style specials are text to SentencePiece
        assert ref.encode(text).ids == tok.encode(text)
        assert ref.encode(text, add_special_tokens=False).ids == tok.encode(text, bos=False)
