"""export.py and gguf_file.py: transformers' own GGUF loader reads our GGUF with our logits; a PAT-narrowed model
keeps its width and head size in the GGUF; Llama 3.1's RoPE scaling goes out as llama.cpp's rope_freqs table;
our reader reads every export back; the script refuses, in one line, what no engine can run.

The expectations come from outside our writer: transformers' loader (which undoes llama.cpp's q/k permutation
itself), gguf's own reader for the metadata, llama.cpp's converter formula for rope_freqs written out here.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

import export
from checkpoint import load, save
from gguf_file import write_gguf
from model import ModelArgs, Transformer
from pat import PAT, merge
from sparsity import prune
from tokenizer import GPT2_PATTERN, SentencePieceTokenizer, TiktokenTokenizer, llama3_tokenizer, vocab_of

gguf = pytest.importorskip("gguf")

LLAMA31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def byte_tokenizer():
    return TiktokenTokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256, "</s>": 257}, GPT2_PATTERN,
                             bos_id=256, eos_id=257, add_bos=True, specials_in_text=False, name="bytes")


def tiny(tie=False, seed=0, **kw):
    """A random tiny Llama (GQA, head_dim 16, norm gains not all ones) on the byte tokenizer's 258 ids."""
    torch.manual_seed(seed)
    config = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, hidden_dim=96, max_seq_len=64,
                  rope_theta=10000.0, tie_embeddings=tie)
    model = Transformer(ModelArgs(**(config | kw))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def pat_merged(tie=False):
    """A PAT model at 25% (64 -> 48 channels, heads still 4 x 16), adapters away from identity, merged."""
    pat = PAT(tiny(tie=tie), ratio=0.25, width_multiple=8, milestone=1, hsm_rank=4, lora_rank=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lora in pat.lora.values():
            lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.05)
        for hsm in pat.hsms.values():
            if hsm.rank:
                hsm.L1.copy_(torch.randn(hsm.L1.shape, generator=g) * 0.2)
    pat.set_hard_mask(torch.randperm(64, generator=g) < 48)
    return merge(pat)


def tokens(batch=2, length=24):
    return torch.randint(258, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model, x):
    with torch.no_grad():
        return model(x).float()


def close(out, ref, rel):
    return (out - ref).abs().max().item() <= rel * ref.abs().max().item()


def q8_0_rounded(model):
    """Our model with every 2-D weight passed through gguf's own q8_0 quantize/dequantize (rows are 32-wide here)."""
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            if p.dim() == 2:
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    return model


def write(model, path, gguf_type="f32"):
    write_gguf(model, vocab_of(byte_tokenizer()), path, gguf_type)
    return path


def fields(path):
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ----------------------------------------------------------------------------- transformers' GGUF loader

@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_transformers_reads_our_gguf_with_our_logits(tmp_path, tie, gguf_type):
    transformers = pytest.importorskip("transformers")
    model, x = tiny(tie=tie), tokens()
    write(model, tmp_path / "m.gguf", gguf_type)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32)
    out = hf.eval()(x).logits.detach().float()
    ref = logits(model, x)
    if gguf_type == "q8_0":  # within q8_0's rounding: exact against the rounded weights, near the original ones
        rounded = logits(q8_0_rounded(model), x)
        assert close(out, rounded, 1e-4) and not close(out, ref, 1e-6) and close(out, ref, 3e-2)
    else:
        assert close(out, ref, 1e-4)
    assert hf.config.tie_word_embeddings == tie


def test_transformers_reads_a_pat_narrowed_gguf(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, x = pat_merged(), tokens()
    write(model, tmp_path / "pat.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="pat.gguf", torch_dtype=torch.float32)
    assert hf.config.hidden_size == 48 and hf.config.head_dim == 16
    assert close(hf.eval()(x).logits.detach().float(), logits(model, x), 1e-4)


# ----------------------------------------------------------------------------- what llama.cpp reads

def test_pat_gguf_keeps_width_and_head_dim_and_reads_back(tmp_path):
    model, x = pat_merged(tie=True), tokens()
    assert model.args.dim == 48 and model.args.n_heads * model.args.head_dim == 64
    meta, tensors = fields(write(model, tmp_path / "pat.gguf"))
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.embedding_length"], meta["llama.attention.key_length"], meta["llama.attention.value_length"],
            meta["llama.rope.dimension_count"]) == (48, 16, 16, 16)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta["llama.block_count"],
            meta["llama.feed_forward_length"], meta["llama.vocab_size"]) == (4, 2, 2, 96, 258)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(model.args.norm_eps)  # rescaled by merge
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tuple(tensors["blk.0.attn_q.weight"].shape) == (48, 64)  # ggml order: (in, out)
    back, tok = load(tmp_path / "pat.gguf")
    assert (back.args.dim, back.args.head_dim, back.args.norm_eps) == (48, 16, pytest.approx(model.args.norm_eps))
    assert close(logits(back, x), logits(model, x), 1e-6)


def test_tokenizer_metadata(tmp_path):
    meta, _ = fields(write(tiny(), tmp_path / "m.gguf"))
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 258
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp's name for GPT-2's split (it refuses "gpt2")
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (256, 257)
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert list(meta["tokenizer.ggml.token_type"][255:]) == [1, 3, 3]  # byte 255 normal, <s> </s> control
    tok = load(tmp_path / "m.gguf")[1]
    text = "Hello, GGUF! 12 ü"
    assert tok.encode(text) == byte_tokenizer().encode(text) and tok.decode(tok.encode(text)[1:]) == text


def tiny_sentencepiece(data_dir):
    """A 400-piece SentencePiece BPE with byte fallback and Llama 2's text handling (no normalisation, spaces kept),
    trained here on WikiText-2's validation text (0.2 s)."""
    import io

    import sentencepiece
    text = (data_dir / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:200_000]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model,
                                             vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2,
                                             normalization_rule_name="identity", remove_extra_whitespaces=False)
    return SentencePieceTokenizer(model.getvalue())


def test_sentencepiece_vocab_reads_back(tmp_path, data_dir):
    """tokens, scores and types go out; our reader merges by score with byte fallback as SentencePiece does."""
    sp = tiny_sentencepiece(data_dir)
    write_gguf(tiny(vocab_size=400), vocab_of(sp), tmp_path / "m.gguf", "f16")
    meta, _ = fields(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.scores"]) == 400
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # <unk>, <s>, </s>, <0x00>
    tok = load(tmp_path / "m.gguf")[1]
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()[:20_000] + " ☃ wörld 1234"
    assert tok.encode(text) == sp.encode(text) and tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "llama3", "llama2"])
def test_real_tokenizers_read_back(tmp_path, data_dir, name):
    """The real vocabularies (32k-128k tokens) through a GGUF: our reader gives the original ids; for the BPE ones,
    so does transformers' GGUF tokenizer (its SentencePiece conversion differs from SentencePiece on spaces)."""
    transformers = pytest.importorskip("transformers")
    tok = {"smollm2": lambda: load("smollm2-135m")[1],
           "llama3": lambda: llama3_tokenizer(data_dir / "tokenizers" / "llama3" / "tokenizer.model"),
           "llama2": lambda: SentencePieceTokenizer((data_dir / "tokenizers" / "llama2" / "tokenizer.model").read_bytes()),
           }[name]()
    vocab = vocab_of(tok)
    write_gguf(tiny(vocab_size=len(vocab.tokens), dim=32, n_layers=1), vocab, tmp_path / "m.gguf", "f16")
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()[:30_000]
    assert load(tmp_path / "m.gguf")[1].encode(text) == tok.encode(text)
    if name != "llama2":
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
        assert hf(text)["input_ids"] == tok.encode(text)


def test_vocab_padded_to_the_embedding_rows(tmp_path):
    """Models often have more embedding rows than tokens: llama.cpp wants a token (unused type) per row."""
    meta, _ = fields(write(tiny(vocab_size=288), tmp_path / "m.gguf"))
    assert len(meta["tokenizer.ggml.tokens"]) == 288 and set(meta["tokenizer.ggml.token_type"][258:]) == {5}


def test_llama31_rope_scaling_as_rope_freqs(tmp_path):
    model, x = tiny(rope_theta=500000.0, rope_scaling=LLAMA31, head_dim=32, n_heads=2, n_kv_heads=1), tokens()
    _, tensors = fields(write(model, tmp_path / "m.gguf"))
    # llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors), written out
    dim, base = 32, 500000.0
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    assert 1.0 < factors[len(factors) // 2] < 8.0  # the table has all three regions
    np.testing.assert_allclose(tensors["rope_freqs.weight"].data, factors, rtol=1e-5)
    back = load(tmp_path / "m.gguf")[0]
    assert back.args.rope_scaling == LLAMA31
    assert close(logits(back, x), logits(model, x), 1e-6)
    model.args.rope_scaling = dict(LLAMA31, factor=32.0)  # Llama 3.2's factor is read off the table too
    write(model, tmp_path / "m32.gguf")
    assert load(tmp_path / "m32.gguf")[0].args.rope_scaling["factor"] == 32.0


# ----------------------------------------------------------------------------- every export reads back

@pytest.mark.parametrize("gguf_type,rel", [("f32", 1e-6), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 3e-2)])
@pytest.mark.parametrize("kind", ["dense", "tied", "2:4", "pat"])
def test_our_reader_reads_every_export_back(tmp_path, kind, gguf_type, rel):
    model = {"dense": tiny, "tied": lambda: tiny(tie=True), "2:4": tiny, "pat": pat_merged}[kind]()
    if kind == "2:4":
        masks = prune(model, "magnitude", (2, 4), log=lambda *a: None)
    write(model, tmp_path / "m.gguf", gguf_type)
    back, _ = load(tmp_path / "m.gguf")
    x = tokens()
    assert back.args == dataclasses.replace(model.args, norm_eps=pytest.approx(model.args.norm_eps))  # GGUF: f32 eps
    assert close(logits(back, x), logits(model, x), rel)
    if kind == "2:4":  # the zeros are stored as zeros in every type: the 2:4 pattern survives
        state = back.state_dict()
        for name, mask in masks.items():
            assert torch.equal(state[name + ".weight"] != 0, mask)


def test_q8_0_keeps_rows_not_32_wide_in_f16(tmp_path):
    """llama.cpp's converter does the same: q8_0 blocks are 32 values of one row."""
    _, tensors = fields(write(pat_merged(), tmp_path / "m.gguf", "q8_0"))
    types = {name: gguf.GGMLQuantizationType(t.tensor_type).name for name, t in tensors.items()}
    assert types["blk.0.attn_q.weight"] == "F16"  # reads the 48 channels
    assert types["blk.0.attn_output.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q8_0"  # 64, 96 wide
    assert types["blk.0.attn_norm.weight"] == "F32"


# ----------------------------------------------------------------------------- the script

def test_export_script_both_formats(tmp_path):
    save(pat_merged(), byte_tokenizer(), tmp_path / "pat")
    export.main(["--ckpt", str(tmp_path / "pat"), "--to", "gguf", "--out", str(tmp_path / "pat.gguf"),
                 "--gguf-type", "f32"])
    export.main(["--ckpt", str(tmp_path / "pat"), "--to", "hf", "--out", str(tmp_path / "hf")])
    ours, x = load(tmp_path / "pat")[0], tokens()
    for out in ("pat.gguf", "hf"):
        assert close(logits(load(tmp_path / out)[0], x), logits(ours, x), 1e-6)


def test_export_refuses_what_no_engine_runs(tmp_path, cli_error):
    save(tiny(slorb_k=4), byte_tokenizer(), tmp_path / "slorb")
    for to in ("gguf", "hf"):
        out = str(tmp_path / ("s.gguf" if to == "gguf" else "s_hf"))
        err = cli_error(lambda: export.main(["--ckpt", str(tmp_path / "slorb"), "--to", to, "--out", out]))
        assert "SLoRB" in err
    narrow = tiny(dim=50, head_dim=16)  # 50 channels, 4 heads of 16: llama.cpp runs it, transformers refuses
    save(narrow, byte_tokenizer(), tmp_path / "narrow")
    err = cli_error(lambda: export.main(["--ckpt", str(tmp_path / "narrow"), "--to", "hf", "--out", str(tmp_path / "h")]))
    assert "not a multiple of the 4 heads" in err and not (tmp_path / "h").exists()
    export.main(["--ckpt", str(tmp_path / "narrow"), "--to", "gguf", "--out", str(tmp_path / "n.gguf")])
    assert load(tmp_path / "n.gguf")[0].args.dim == 50


def test_export_never_overwrites_without_overwrite(tmp_path, cli_error):
    save(tiny(), byte_tokenizer(), tmp_path / "m")
    (tmp_path / "m.gguf").write_bytes(b"a run's result")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    for to, out in (("gguf", "m.gguf"), ("hf", "hf")):
        args = ["--ckpt", str(tmp_path / "m"), "--to", to, "--out", str(tmp_path / out)]
        assert "--overwrite" in cli_error(lambda: export.main(args))
    assert (tmp_path / "m.gguf").read_bytes() == b"a run's result"
    export.main(["--ckpt", str(tmp_path / "m"), "--to", "gguf", "--out", str(tmp_path / "m.gguf"), "--overwrite"])
    assert load(tmp_path / "m.gguf")[0].args.dim == 64
    assert "--out is required" in cli_error(lambda: export.main(["--ckpt", str(tmp_path / "m")]))
    assert ".gguf" in cli_error(lambda: export.main(["--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "x.bin")]))


@pytest.mark.slow
def test_smollm2_export_reads_in_transformers(tmp_path, smollm2):
    """python export.py --ckpt smollm2-135m --to gguf --out m.gguf: transformers' GGUF loader gives our logits."""
    transformers = pytest.importorskip("transformers")
    model, tok = smollm2
    export.main(["--ckpt", "smollm2-135m", "--to", "gguf", "--out", str(tmp_path / "m.gguf"), "--gguf-type", "f32"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32)
    x = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is Rome. 12345")])
    assert close(hf.eval()(x).logits.detach().float(), logits(model, x), 1e-4)
    assert load(tmp_path / "m.gguf")[1].encode("Digits 2024 split") == tok.encode("Digits 2024 split")
