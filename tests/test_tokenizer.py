"""Our tokenizers against the libraries used directly (SentencePiece, tiktoken) and Hugging Face's tokenizer."""
import json
import re

import pytest

from checkpoint import fetch_smollm2
from hf import tokenizer_json
from tokenizer import (LLAMA3_PATTERN, SentencePieceTokenizer, TiktokenTokenizer, llama3_tokenizer, load_tokenizer,
                       vocab_of)


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


def test_a_split_regex_llama_cpp_has_no_name_for_goes_into_tokenizer_json_as_a_split(data_dir):
    """A byte-level BPE with any other split regex (the trainers' tests use one) exports as Split + ByteLevel."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = TiktokenTokenizer({bytes([i]): i for i in range(256)} | {b"  ": 256, b"th": 257, b"the": 258},
                            {"<s>": 259}, r"\S+|\s+", bos_id=259, eos_id=259, add_bos=True, specials_in_text=False)
    vocab = vocab_of(tok)
    assert vocab.pre is None and vocab.pattern == r"\S+|\s+"
    ref = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(vocab)))
    for text in sample_texts(data_dir)[:200] + ["the  then\n\n  x", "héllo 中文 12"]:
        assert ref.encode(text).ids == tok.encode(text)


# ----------------------------------------------------------------------------- Hugging Face tokenizer.json directories

EDGE_TEXTS = ["", " ", "  \n\t 3.14159 $1,000 12345678", "a  1 x 12  345\n\n  7 héllo wörld 😀 It's 中文 𝔘",
              " leading space", "trailing  ", "<s> hi</s>", "<|begin_of_text|>x<|eot_id|> <|im_start|>y\n"]
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])
FIXTURES = ("smollm2", "llama2", "llama2-metaspace", "llama3")


def task_strings(data_dir, per_file=None):
    """Every string in every record of every zero-shot task file (questions, contexts, endings, choices...)."""
    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, (list, dict)):
            for v in (x.values() if isinstance(x, dict) else x):
                yield from strings(v)
    out = []
    for f in sorted((data_dir / "tasks").glob("*.jsonl")):
        for line in f.read_text().splitlines()[:per_file]:
            out += strings(json.loads(line))
    return out


def write_fixture(name, out, data_dir):
    """A Hub-style tokenizer directory (tokenizer.json + tokenizer_config.json) built by transformers/tokenizers,
    not by us: SmolLM2's from its GGUF with the real file's pre-tokenizer (digits one by one, then GPT-2's
    byte-level regex); Llama 2's from SentencePiece's pieces and scores with transformers' merge generation and
    the Hub file's normaliser (Prepend + Replace; "-metaspace" keeps transformers 5's Metaspace instead); Llama 3's
    from tiktoken ranks with transformers' TikTokenConverter."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.tokenization_utils_base import generate_merges
    out.mkdir(parents=True)
    if name == "smollm2":
        gguf = fetch_smollm2()
        hf = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).backend_tokenizer
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        config = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", add_bos_token=False)  # SmolLM2-Instruct's
    elif name.startswith("llama2"):
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=str(data_dir / "tokenizers" / "llama2" / "tokenizer.model"))
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        skip = [p for i, p in enumerate(pieces) if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)]
        merges = generate_merges({p: i for i, p in enumerate(pieces)}, {p: sp.get_score(i) for i, p in enumerate(pieces)},
                                 skip_tokens=skip)
        hf = transformers.LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges).backend_tokenizer
        if name == "llama2":
            hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            hf.pre_tokenizer = None
        hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", 1)])
        config = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    else:
        path = data_dir / "tokenizers" / "llama3" / "tokenizer.model"
        hf = TikTokenConverter(str(path), extra_special_tokens=LLAMA3_SPECIALS).converted()
        hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
            ("<|begin_of_text|>", 128000)])
        config = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    hf.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, data_dir):
    """name -> a Hub-style tokenizer directory, built once per session when first asked for."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = write_fixture(name, tmp_path_factory.mktemp("hf") / name, data_dir)
        return built[name]
    return get


def original_ids(name, data_dir, smollm2_tok):
    """The original tokenizer each fixture was built from (ids without BOS), to check the fixture itself."""
    if name == "llama2":
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=str(data_dir / "tokenizers" / "llama2" / "tokenizer.model"))
        return sp.encode
    if name == "llama3":
        tok = llama3_tokenizer(data_dir / "tokenizers" / "llama3" / "tokenizer.model")
        return lambda text: tok.encode(text, bos=False)
    return lambda text: smollm2_tok.encode(text, bos=False)  # the GGUF's tokenizer (checked above against transformers)


def check_ids(name, directory, texts, data_dir, smollm2_tok):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok = load_tokenizer(directory)
    original = original_ids(name, data_dir, smollm2_tok) if name != "llama2-metaspace" else None
    n = 0
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids, text[:200]
        has_special = re.search(r"<s>|</s>|<\|", text)
        if original and not has_special:  # the fixture's ids are the original tokenizer's
            assert ref.encode(text, add_special_tokens=False).ids == original(text), text[:200]
        n += len(ids)
    return tok, n


@pytest.mark.parametrize("name", FIXTURES)
def test_hub_tokenizer_json_ids_equal_the_tokenizers_library(name, hf_dirs, data_dir, smollm2):
    """A directory with only tokenizer.json + tokenizer_config.json: our ids are the `tokenizers` library's on a sample
    of WikiText-2 and of every task file (the whole files: the slow test below), and the fixture's are the original's."""
    wiki = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()
    texts = [wiki[:30000], *wiki[:30000].splitlines(keepends=True), *task_strings(data_dir, per_file=25), *EDGE_TEXTS]
    tok, n = check_ids(name, hf_dirs(name), texts, data_dir, smollm2[1])
    assert n > 15000
    kind, bos, eos, add_bos = {"smollm2": ("tiktoken", 1, 2, False), "llama2": ("sentencepiece-bpe", 1, 2, True),
                               "llama2-metaspace": ("sentencepiece-bpe", 1, 2, True),
                               "llama3": ("tiktoken", 128000, 128001, True)}[name]
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos) == (kind, bos, eos, add_bos)
    assert tok.decode(tok.encode(wiki[3:5000], bos=False)) == wiki[3:5000]  # from "= Robert Boulter"


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXTURES)
def test_hub_tokenizer_json_ids_on_all_of_wikitext2_and_every_task_file(name, hf_dirs, data_dir, smollm2):
    wiki = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()
    _, n = check_ids(name, hf_dirs(name), [wiki, *task_strings(data_dir)], data_dir, smollm2[1])
    print(f"{name}: {n} tokens equal")


def test_hf_config_sets_bos_eos_add_bos_and_stop_ids_beside_a_tokenizer_model(data_dir, tmp_path):
    """tokenizer_config.json and generation_config.json apply to tokenizer.model too (Llama 3.1 Instruct's
    original/tokenizer.model with EOS <|eot_id|> and three stop ids; a Llama 2 without BOS); save() keeps them."""
    llama3, llama2 = tmp_path / "llama3", tmp_path / "llama2"
    (llama3 / "original").mkdir(parents=True)
    llama2.mkdir()
    (llama3 / "original" / "tokenizer.model").write_bytes((data_dir / "tokenizers/llama3/tokenizer.model").read_bytes())
    (llama3 / "tokenizer_config.json").write_text(json.dumps(dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")))
    (llama3 / "generation_config.json").write_text(json.dumps(dict(eos_token_id=[128001, 128008, 128009])))
    (llama2 / "tokenizer.model").write_bytes((data_dir / "tokenizers/llama2/tokenizer.model").read_bytes())
    (llama2 / "tokenizer_config.json").write_text(json.dumps(dict(add_bos_token=False, eos_token={"content": "</s>"})))
    tok3, tok2 = load_tokenizer(llama3), load_tokenizer(llama2)
    assert (tok3.kind, tok3.bos_id, tok3.eos_id, tok3.stop_ids, tok3.add_bos) == (
        "tiktoken", 128000, 128009, (128001, 128008, 128009), True)
    assert (tok2.kind, tok2.eos_id, tok2.stop_ids, tok2.add_bos) == ("sentencepiece", 2, (2,), False)
    assert tok2.encode("Hello") == [15043] and tok3.encode("Hello") == [128000, 9906]
    for tok in (tok3, tok2):
        (tmp_path / f"copy-{tok.kind}").mkdir()
        tok.save(tmp_path / f"copy-{tok.kind}")
        back = load_tokenizer(tmp_path / f"copy-{tok.kind}")
        assert (back.bos_id, back.eos_id, back.stop_ids, back.add_bos) == (tok.bos_id, tok.eos_id, tok.stop_ids, tok.add_bos)
    (llama2 / "tokenizer_config.json").write_text(json.dumps(dict(eos_token="<|im_end|>")))
    with pytest.raises(ValueError, match="eos_token '<\\|im_end\\|>' is not in the vocabulary"):
        load_tokenizer(llama2)


def test_metaspace_that_splits_every_space_equals_the_tokenizers_library(hf_dirs, tmp_path):
    """Metaspace(split=true) (the default of files that don't say) starts a piece at every "▁": "▁▁" never forms."""
    from tokenizers import Tokenizer
    spec = json.loads((hf_dirs("llama2-metaspace") / "tokenizer.json").read_text())
    spec["pre_tokenizer"] |= {"split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ref, tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json")), load_tokenizer(tmp_path)
    for text in ["a  b    c", "   leading", "x\n  \n   y  ", *EDGE_TEXTS]:
        assert tok.encode(text) == ref.encode(text).ids, text
