"""Our Llama against transformers' LlamaForCausalLM on the same weights, through every checkpoint format.

The Meta files are written here by the test itself (names, q/k permutation and shard splits written out
independently of checkpoint.py), so a wrong rule in the loader can't hide behind the same rule in the writer.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import export_hf, load_masks, save
from model import Transformer, UserError, load

transformers = pytest.importorskip("transformers")

LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
CONFIGS = {
    "untied-llama2": dict(tie=False, theta=10000.0, scaling=None, embed_split=1),
    "tied-llama31": dict(tie=True, theta=500000.0, scaling=LLAMA31_SCALING, embed_split=0),
}


def hf_reference(tie, theta, scaling, **_):
    """A random tiny HF Llama: 4 heads, 2 kv heads, head_dim 16, norms not all ones."""
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, rms_norm_eps=1e-5, rope_theta=theta, max_position_embeddings=128,
        rope_scaling=dict(rope_type="llama3", **scaling) if scaling else None, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() == 2 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def write_meta(hf_model, out, n_shards, embed_split, scaling):
    """Meta's consolidated.*.pth layout, written from the HF state dict by hand."""
    sd = hf_model.state_dict()
    c = hf_model.config
    hd = c.hidden_size // c.num_attention_heads

    def to_meta(w, heads):  # HF halves -> Meta interleaved pairs (the doc's formula)
        return w.view(heads, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(heads * hd, w.shape[1])

    full = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    names = dict(q_proj="attention.wq", k_proj="attention.wk", v_proj="attention.wv", o_proj="attention.wo",
                 gate_proj="feed_forward.w1", down_proj="feed_forward.w2", up_proj="feed_forward.w3")
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf, meta in names.items():
            w = sd[p + ("self_attn." if "proj" in hf and hf[0] in "qkvo" else "mlp.") + hf + ".weight"]
            if hf == "q_proj":
                w = to_meta(w, c.num_attention_heads)
            elif hf == "k_proj":
                w = to_meta(w, c.num_key_value_heads)
            full[f"layers.{i}.{meta}.weight"] = w
        full[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        full[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    for r in range(n_shards):
        shard = {}
        for k, w in full.items():
            if w.dim() == 1:
                shard[k] = w.clone()
            else:
                dim = embed_split if k == "tok_embeddings.weight" else 1 if (".wo." in k or ".w2." in k) else 0
                shard[k] = w.chunk(n_shards, dim=dim)[r].clone()
        torch.save(shard, out / f"consolidated.{r:02d}.pth")
    params = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                  n_kv_heads=c.num_key_value_heads, vocab_size=-1, multiple_of=32, norm_eps=c.rms_norm_eps,
                  rope_theta=c.rope_theta if hasattr(c, "rope_theta") else c.rope_parameters["rope_theta"])
    if scaling:
        params["use_scaled_rope"] = True
    (out / "params.json").write_text(json.dumps(params))


@pytest.fixture(params=list(CONFIGS))
def case(request):
    cfg = CONFIGS[request.param]
    hf = hf_reference(**cfg)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    return cfg, hf, tokens, hf_logits(hf, tokens)


def test_hf_safetensors_matches_transformers(case, tmp_path):
    cfg, hf, tokens, ref = case
    hf.save_pretrained(tmp_path)
    model, _ = load(tmp_path, tokenizer=False)
    assert model.args.tie_embeddings == cfg["tie"]
    torch.testing.assert_close(model(tokens), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_shards_match_transformers(case, tmp_path, n_shards):
    cfg, hf, tokens, ref = case
    if cfg["tie"]:  # Meta checkpoints always carry output.weight: untie the reference's copy
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    write_meta(hf, tmp_path, n_shards, cfg["embed_split"], cfg["scaling"])
    model, _ = load(tmp_path, tokenizer=False)
    assert model.args.hidden_dim == 192 and (model.args.rope_scaling is not None) == bool(cfg["scaling"])
    torch.testing.assert_close(model(tokens), ref, rtol=1e-4, atol=1e-4)


def test_ours_and_hf_export_round_trip(case, tmp_path):
    cfg, hf, tokens, ref = case
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load(tmp_path / "hf", tokenizer=False)
    save(model, None, tmp_path / "ours")
    ours, _ = load(tmp_path / "ours", tokenizer=False)
    torch.testing.assert_close(ours(tokens), ref, rtol=1e-4, atol=1e-4)
    export_hf(ours, None, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back, tokens), ref, rtol=1e-4, atol=1e-4)


def test_pruned_shape_head_dim_and_masks_round_trip(tiny_args, tmp_path):
    """A model whose dim was pruned (n_heads * head_dim != dim) saves, exports and reloads; masks keep exact zeros."""
    torch.manual_seed(0)
    model = Transformer(tiny_args(dim=48, head_dim=16, hidden_dim=96)).eval()
    w = model.layers[0].feed_forward.w1.weight
    mask = torch.rand_like(w) > 0.5
    with torch.no_grad():
        w.mul_(mask)
    tokens = torch.randint(0, 256, (1, 16))
    save(model, None, tmp_path / "ours", masks={"layers.0.feed_forward.w1": mask})
    back, _ = load(tmp_path / "ours", tokenizer=False)
    assert torch.equal(back(tokens), model(tokens))
    assert torch.equal(load_masks(tmp_path / "ours")["layers.0.feed_forward.w1"], mask)
    assert torch.equal(back.layers[0].feed_forward.w1.weight == 0, ~mask | (w == 0))
    export_hf(model, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(hf, tokens), model(tokens), rtol=1e-4, atol=1e-4)


def test_kv_cache_and_generate_match_full_forward(tiny_args):
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    tokens = torch.randint(0, 256, (2, 24))
    full = model(tokens)
    model.setup_cache(2, 24)
    parts = [model(tokens[:, :10], start_pos=0), model(tokens[:, 10:11], start_pos=10), model(tokens[:, 11:], start_pos=11)]
    model.setup_cache(None, None)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    new = model.generate(tokens[0, :5].tolist(), 6)
    seq = tokens[0, :5].tolist()
    for t in new:  # greedy: each generated token is the argmax of a full forward over what came before
        assert t == int(model(torch.tensor([seq]))[0, -1].argmax())
        seq.append(t)


def test_bf16_forward_close_to_fp32(tiny_args):
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    tokens = torch.randint(0, 256, (1, 32))
    ref = model(tokens)
    out = model.to(torch.bfloat16)(tokens)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_smollm2_matches_transformers_on_our_export(smollm2, data_dir, tmp_path):
    """The real model: logits of transformers loading our HF export equal ours (fp32 rounding)."""
    model, tok = smollm2
    export_hf(model, tok, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()[:4000]
    tokens = torch.tensor([tok.encode(text)[:128]])
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), rtol=1e-4, atol=2e-4)
    assert model.args.n_layers == 30 and model.args.n_kv_heads == 3 and model.args.tie_embeddings


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loader(smollm2, data_dir):
    """transformers reading the same GGUF itself (its own dequantisation) gives our logits."""
    from checkpoint import fetch_smollm2
    model, tok = smollm2
    path = fetch_smollm2()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()[:4000]
    tokens = torch.tensor([tok.encode(text)[:256]])
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), rtol=1e-4, atol=2e-4)


# ----------------------------------------------------------------------------- bad input

class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/sparsellama_pwned",))


def test_bad_input_gives_one_clear_error(tiny_args, tmp_path):
    with pytest.raises(UserError, match="unknown checkpoint"):
        load("not-a-model")
    with pytest.raises(UserError, match="not found"):
        load("llama2-7b")  # no checkpoints/llama2-7b/ here
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        load(tmp_path / "empty")

    model = Transformer(tiny_args())
    save(model, None, tmp_path / "ours")
    blob = (tmp_path / "ours" / "model.safetensors").read_bytes()
    (tmp_path / "ours" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load(tmp_path / "ours", tokenizer=False)

    meta = tmp_path / "meta"
    meta.mkdir()
    sd = {k: v for k, v in Transformer(tiny_args()).state_dict().items()}
    torch.save(sd, meta / "consolidated.00.pth")
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, norm_eps=1e-5)
    (meta / "params.json").write_text(json.dumps(params | {"n_layers": 3}))
    with pytest.raises(UserError, match="different models"):
        load(meta, tokenizer=False)
    (meta / "params.json").write_text(json.dumps(params | {"n_kv_heads": 4}))
    with pytest.raises(UserError, match="different models"):
        load(meta, tokenizer=False)
    (meta / "params.json").write_text(json.dumps(params))
    blob = (meta / "consolidated.00.pth").read_bytes()
    (meta / "consolidated.00.pth").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load(meta, tokenizer=False)
    torch.save({"tok_embeddings.weight": RunsCode()}, meta / "consolidated.00.pth")
    with pytest.raises(UserError, match="refusing to load"):
        load(meta, tokenizer=False)
    assert not os.path.exists("/tmp/sparsellama_pwned")


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    code = "from model import cli_main, load; cli_main(lambda: load('/no/such/dir'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: ")


def test_train_after_inference_mode_eval(tiny_args):
    """Evaluating under inference_mode (perplexity) must not poison the RoPE table for a later backward."""
    model = Transformer(tiny_args())
    tokens = torch.randint(0, 256, (1, 16))
    with torch.inference_mode():
        model(tokens)
    model(tokens).sum().backward()
    assert model.layers[0].attention.wq.weight.grad is not None
