"""checkpoint.py: every format we read (Meta 1 or 2 shards, Hugging Face, GGUF, ours) against transformers'
LlamaForCausalLM on the same weights; our format and the HF export round trip; masks; bad input.
(Hugging Face safetensors straight into our model: test_model.py's forward test.)

The Meta files are written here by the test itself (names, q/k permutation and shard splits written out
independently of checkpoint.py), so a wrong rule in the loader can't hide behind the same rule in the writer.
"""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import checkpoint
from checkpoint import export_hf, fetch_smollm2, load, load_masks, save
from cli import UserError, cli_main
from model import Transformer
from packed import PACKED_FILE
from tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")


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


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_shards_match_transformers(hf_case, tmp_path, n_shards):
    case, hf, tokens, ref = hf_case
    if case["tie"]:  # Meta checkpoints always carry output.weight: untie the reference's copy
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    write_meta(hf, tmp_path, n_shards, case["embed_split"], case["scaling"])
    model, _ = load(tmp_path, tokenizer=False)
    assert model.args.hidden_dim == 192 and (model.args.rope_scaling is not None) == bool(case["scaling"])
    torch.testing.assert_close(model(tokens), ref, rtol=1e-4, atol=1e-4)


def test_ours_and_hf_export_round_trip(hf_case, tmp_path):
    case, hf, tokens, ref = hf_case
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


def test_a_config_describing_an_impossible_model_is_one_line_naming_the_path(tiny_args, tmp_path, capsys):
    """model.py raises ValueError (n_heads not a multiple of n_kv_heads); load reports it with the path."""
    sd = Transformer(tiny_args()).state_dict()
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save(sd, meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=3, vocab_size=-1,
                                                      multiple_of=32, norm_eps=1e-5)))
    ours = tmp_path / "ours"
    save(Transformer(tiny_args()), None, ours)
    (ours / "params.json").write_text(json.dumps(json.loads((ours / "params.json").read_text()) | {"n_kv_heads": 3}))
    hf = tmp_path / "hf"
    export_hf(Transformer(tiny_args()), None, hf)
    (hf / "config.json").write_text(json.dumps(json.loads((hf / "config.json").read_text()) | {"num_key_value_heads": 3}))
    for path in (meta, ours, hf):
        with pytest.raises(UserError) as e:
            load(path, tokenizer=False)
        assert str(e.value) == f"{path}: n_heads=4 is not a multiple of n_kv_heads=3"
        with pytest.raises(SystemExit) as e:
            cli_main(lambda: load(path, tokenizer=False))
        assert e.value.code == 1
        assert capsys.readouterr().err == f"error: {path}: n_heads=4 is not a multiple of n_kv_heads=3\n"


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    code = "from cli import cli_main; from checkpoint import load; cli_main(lambda: load('/no/such/dir'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: ")


# ----------------------------------------------------------------------------- Hugging Face: tokenizers, Hub, export

EXPORT_TEXTS = ["Hello world", " leading space, 12345 and 3.14", "héllo wörld 😀 中文\n\n  tabs\tand  spaces  ",
                "It's the model's 2nd try: x = [1, 2]; y"]


def tiny_model_for(tiny_args, vocab_size, tie):
    torch.manual_seed(0)
    return Transformer(tiny_args(vocab_size=vocab_size, tie_embeddings=tie)).eval()


@pytest.mark.parametrize("which", ["llama2", pytest.param("llama3", marks=pytest.mark.slow), "smollm2"])
def test_hf_export_loads_in_transformers_with_our_ids_and_logits(which, tiny_args, data_dir, smollm2, tmp_path):
    """export_hf writes the tokenizer in Hugging Face's files: AutoTokenizer gives our ids, AutoModelForCausalLM our
    logits, and checkpoint.load reads the export back with the same ids."""
    from tokenizer import load_tokenizer
    if which == "smollm2":
        model, tok = smollm2
    else:
        tok = load_tokenizer(data_dir / "tokenizers" / which)
        model = tiny_model_for(tiny_args, tok.vocab_size, tie=which == "llama3")
    wiki = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()[:6000]
    export_hf(model, tok, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert ("tokenizer.model" in names) == (which == "llama2") and "tokenizer.tiktoken" not in names
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [wiki, *wiki.splitlines(keepends=True)[:40], *EXPORT_TEXTS]:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text[:80]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.tensor([tok.encode(wiki)[:64]])
    torch.testing.assert_close(hf_logits(hf, tokens), model(tokens), rtol=1e-4, atol=2e-4)
    back, back_tok = load(tmp_path)
    assert [back_tok.encode(t) for t in EXPORT_TEXTS + [wiki]] == [tok.encode(t) for t in EXPORT_TEXTS + [wiki]]
    assert torch.equal(back(tokens), model(tokens))


def test_our_format_names_its_tiktoken_config_apart_and_still_reads_the_old_name(tiny_args, tmp_path):
    """Our format's tiktoken settings are tokenizer_tiktoken.json: tokenizer_config.json is Hugging Face's name."""
    from tokenizer import GPT2_PATTERN, TiktokenTokenizer
    tok = TiktokenTokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256}, GPT2_PATTERN, bos_id=256, eos_id=256,
                            add_bos=True, specials_in_text=False)
    save(Transformer(tiny_args(vocab_size=257)), tok, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "tokenizer_tiktoken.json" in names and "tokenizer_config.json" not in names
    (tmp_path / "tokenizer_tiktoken.json").rename(tmp_path / "tokenizer_config.json")  # a checkpoint of before
    _, old = load(tmp_path)
    assert old.encode("x <s> y") == tok.encode("x <s> y") and (old.bos_id, old.add_bos) == (256, True)


UNSUPPORTED = {  # config.json changes -> what the error must name
    "qwen2": (dict(model_type="qwen2"), "model_type 'qwen2'"),
    "biases": (dict(attention_bias=True), "attention_bias=true"),
    "mistral-sliding-window": (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096"),
    "mixtral-moe": (dict(model_type="mixtral", num_local_experts=8), "num_local_experts=8 (mixture of experts)"),
    "linear-rope": (dict(rope_scaling=dict(rope_type="linear", factor=2.0)), "rope_scaling type 'linear'"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_an_architecture_we_dont_implement_is_one_line_naming_it(case, tiny_args, tmp_path, cli_error):
    export_hf(Transformer(tiny_args()), None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | UNSUPPORTED[case][0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = cli_error(lambda: load(tmp_path, tokenizer=False))
    assert UNSUPPORTED[case][1] in err and "config.json needs what our Llama lacks" in err
    (tmp_path / "config.json").write_text(json.dumps(config | dict(model_type="mistral", sliding_window=None,
                                                                   attention_bias=False, num_local_experts=0,
                                                                   rope_scaling=None, hidden_act="silu")))
    load(tmp_path, tokenizer=False)  # Mistral without a sliding window is a Llama


def hub_model(tiny_args, data_dir, out):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(data_dir / "tokenizers" / "llama2")
    export_hf(tiny_model_for(tiny_args, tok.vocab_size, tie=False), tok, out)
    (out / "tokenizer.model").unlink()  # as many Hub repositories ship: tokenizer.json only
    return out


def test_hub_names_resolve_through_huggingface_hub(tiny_args, data_dir, tmp_path, monkeypatch, cli_error):
    """org/name goes to huggingface_hub.snapshot_download (replaced here by a local directory: no network)."""
    hub = pytest.importorskip("huggingface_hub")
    snapshot = hub_model(tiny_args, data_dir, tmp_path / "snapshot")
    calls = []

    def online(name, allow_patterns=None, local_files_only=False):
        calls.append((name, allow_patterns, local_files_only))
        return str(snapshot)
    monkeypatch.setattr(hub, "snapshot_download", online)
    model, tok = load("meta-llama/Llama-2-7b-hf")
    assert calls[0][:1] == ("meta-llama/Llama-2-7b-hf",) and not any(".bin" in p or ".pth" in p for p in calls[0][1])
    assert tok.kind == "sentencepiece-bpe" and tok.encode(" Hello world") == [1, 29871, 15043, 3186]

    def offline_but_cached(name, allow_patterns=None, local_files_only=False):
        if not local_files_only:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return str(snapshot)
    monkeypatch.setattr(hub, "snapshot_download", offline_but_cached)
    assert load("meta-llama/Llama-2-7b-hf")[1].encode("Hi") == tok.encode("Hi")

    def offline_nothing_cached(name, allow_patterns=None, local_files_only=False):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")
    monkeypatch.setattr(hub, "snapshot_download", offline_nothing_cached)
    err = cli_error(lambda: load("HuggingFaceTB/SmolLM2-135M"))
    assert "'HuggingFaceTB/SmolLM2-135M' is neither a local path nor in the Hugging Face cache" in err
    assert "hf download HuggingFaceTB/SmolLM2-135M" in err and "couldn't connect" in err
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the package is not installed
    assert "pip install huggingface_hub" in cli_error(lambda: load("HuggingFaceTB/SmolLM2-135M"))


def test_a_tokenizer_json_we_dont_read_is_one_line_naming_the_part(tiny_args, data_dir, tmp_path, cli_error):
    hub = hub_model(tiny_args, data_dir, tmp_path / "hub")
    spec = json.loads((hub / "tokenizer.json").read_text())
    (hub / "tokenizer.json").write_text(json.dumps(spec | {"normalizer": {"type": "NFKC"}}))
    assert "normalizer {\"type\": \"NFKC\"}" in cli_error(lambda: load(hub))
    (hub / "tokenizer.json").write_text(json.dumps(spec | {"model": spec["model"] | {"type": "WordPiece"}}))
    assert "a WordPiece model with these options is not supported" in cli_error(lambda: load(hub))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, byte_level]}
    (hub / "tokenizer.json").write_text(json.dumps(spec | {"pre_tokenizer": pre, "normalizer": None}))
    assert "pre-tokenizer" in cli_error(lambda: load(hub)) and "Punctuation" in cli_error(lambda: load(hub))


def test_hf_export_of_a_hub_llama2_directory_keeps_its_ids_in_transformers(tiny_args, data_dir, tmp_path):
    """A Hub Llama 2 directory says tokenizer_class LlamaTokenizer, and transformers 5's LlamaTokenizer replaces the
    file's Prepend+Replace normaliser by its own Metaspace, which adds no "▁" before a leading space (not
    SentencePiece's ids). The export names the generic class, so AutoTokenizer encodes as the file says."""
    hub = hub_model(tiny_args, data_dir, tmp_path / "hub")
    config = json.loads((hub / "tokenizer_config.json").read_text()) | {"tokenizer_class": "LlamaTokenizer"}
    (hub / "tokenizer_config.json").write_text(json.dumps(config))
    text = " = Robert Boulter = \n"
    assert transformers.AutoTokenizer.from_pretrained(hub)(text)["input_ids"] == [1, 353, 4755, 350, 5059, 357, 353, 29871, 13]
    model, tok = load(hub)
    assert tok.encode(text) == [1, 29871, 353, 4755, 350, 5059, 357, 353, 29871, 13]  # SentencePiece's
    export_hf(model, tok, tmp_path / "export")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "export")(text)["input_ids"] == tok.encode(text)
    assert json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())["bos_token"] == "<s>"
@pytest.mark.parametrize("key", ["rope_theta", "norm_eps", "max_seq_len", "n_layers", "slorb_k"])
def test_our_params_json_without_a_field_names_it_instead_of_using_a_default(tiny_args, tmp_path, key, cli_error):
    """A default rope_theta or norm_eps would load another model silently; a default n_layers blamed the weights."""
    save(Transformer(tiny_args(rope_theta=500000.0, norm_eps=1e-6)), None, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    del params[key]
    (tmp_path / "params.json").write_text(json.dumps(params))
    err = cli_error(lambda: load(tmp_path, tokenizer=False))
    assert err == (f"error: {tmp_path / 'params.json'} lacks '{key}': save() writes every field of model.ModelArgs; "
                   f"restore the file or save the model again\n")


@pytest.mark.parametrize("key, value, kind", [
    ("rope_theta", "abc", "a finite positive number"), ("rope_theta", float("nan"), "a finite positive number"),
    ("norm_eps", float("inf"), "a finite number, 0 or more"), ("n_layers", 2.5, "a positive integer"),
    ("n_layers", True, "a positive integer"), ("dim", -64, "a positive integer"),
    ("max_seq_len", "128", "a positive integer"), ("tie_embeddings", "no", "true or false"),
    ("rope_scaling", {"factor": 8.0}, "null or an object of factor"),
])
def test_a_params_field_of_the_wrong_kind_is_one_line(tiny_args, tmp_path, key, value, kind, cli_error):
    save(Transformer(tiny_args()), None, tmp_path / "ours")
    params = json.loads((tmp_path / "ours" / "params.json").read_text())
    (tmp_path / "ours" / "params.json").write_text(json.dumps(params | {key: value}))
    err = cli_error(lambda: load(tmp_path / "ours", tokenizer=False))
    assert err.startswith(f"error: {tmp_path / 'ours' / 'params.json'}: {key} is {json.dumps(value)[:40]}, "
                          f"but must be {kind}")


def test_a_meta_params_field_of_the_wrong_kind_is_one_line_before_the_shards_load(tiny_args, tmp_path, cli_error,
                                                                                 monkeypatch):
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save(Transformer(tiny_args()).state_dict(), meta / "consolidated.00.pth")
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, norm_eps=1e-5)
    monkeypatch.setattr(checkpoint, "_torch_load", lambda p: pytest.fail("read the weights before params.json"))
    for bad, says in [({"rope_theta": "abc"}, "rope_theta is \"abc\", but must be a finite positive number"),
                      ({"multiple_of": 0}, "multiple_of is 0, but must be a positive integer"),
                      ({"vocab_size": 0}, "vocab_size is 0, but must be -1 (from the weights) or a positive integer")]:
        (meta / "params.json").write_text(json.dumps(params | bad))
        assert cli_error(lambda: load(meta, tokenizer=False)) == f"error: {meta / 'params.json'}: {says}\n"
    (meta / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "n_layers"}))
    assert "has no 'n_layers'" in cli_error(lambda: load(meta, tokenizer=False))


def test_a_plain_pickle_is_refused_as_unsafe_and_read_when_it_holds_only_tensors(tiny_args, tmp_path):
    """pickle.dump / torch's legacy format can't be memory-mapped: read whole, still weights_only; a code-running
    object is refused as unsafe, not called truncated."""
    meta = tmp_path / "meta"
    meta.mkdir()
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, norm_eps=1e-5)
    (meta / "params.json").write_text(json.dumps(params))
    with open(meta / "consolidated.00.pth", "wb") as f:
        pickle.dump({"tok_embeddings.weight": RunsCode()}, f)
    with pytest.raises(UserError, match="refusing to load .*could run code"):
        load(meta, tokenizer=False)
    torch.save({"tok_embeddings.weight": RunsCode()}, meta / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="refusing to load .*could run code"):
        load(meta, tokenizer=False)
    assert not os.path.exists("/tmp/sparsellama_pwned")
    model = Transformer(tiny_args())
    torch.save(model.state_dict(), meta / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    tokens = torch.randint(0, 256, (1, 8))
    assert torch.equal(load(meta, tokenizer=False)[0](tokens), model(tokens))


def test_save_over_a_packed_or_masked_folder_leaves_only_the_new_model(tiny_args, tmp_path):
    """A packed copy, masks or meta.json of an earlier model would be read with the new one (load prefers none of
    them, load_masks returns the stale masks)."""
    old = Transformer(tiny_args())
    save(old, None, tmp_path, masks={"layers.0.attention.wq": torch.ones(64, 64, dtype=torch.bool)}, meta={"a": 1})
    (tmp_path / PACKED_FILE).write_bytes(b"an older packed model")
    torch.manual_seed(1)
    new = Transformer(tiny_args())
    save(new, None, tmp_path)
    assert not (tmp_path / PACKED_FILE).exists() and load_masks(tmp_path) is None
    assert not (tmp_path / "meta.json").exists()
    tokens = torch.randint(0, 256, (1, 8))
    assert torch.equal(load(tmp_path, tokenizer=False)[0](tokens), new(tokens))


def test_a_save_or_export_over_another_models_folder_leaves_only_the_new_tokenizer_and_format(tiny_args, data_dir,
                                                                                              tmp_path):
    """--overwrite into another model's folder: load_tokenizer read an earlier tokenizer.tiktoken before the new
    tokenizer.model (Llama 3's ids for a Llama 2 model), and an hf export kept params.json, so load() read it as ours."""
    llama2, llama3 = (load_tokenizer(data_dir / "tokenizers" / name) for name in ("llama2", "llama3"))
    from_json = tmp_path / "json"
    export_hf(Transformer(tiny_args()), llama2, from_json)
    (from_json / "tokenizer.model").unlink()
    llama2_json = load_tokenizer(from_json)
    model, out, text = Transformer(tiny_args()), tmp_path / "out", "Hello world"
    save(model, llama3, out)
    save(model, llama2, out)
    assert load_tokenizer(out).encode(text) == llama2.encode(text) != llama3.encode(text)
    save(model, llama2_json, out)
    assert load_tokenizer(out).kind == "sentencepiece-bpe" and not (out / "tokenizer.model").exists()
    save(model, llama3, out, masks={"layers.0.attention.wq": torch.ones(64, 64, dtype=torch.bool)}, meta={"a": 1})
    export_hf(model, None, out)
    assert load_tokenizer(out) is None and load_masks(out) is None and not (out / "meta.json").exists()
    tokens = torch.randint(0, 256, (1, 8))
    assert torch.equal(load(out, tokenizer=False)[0](tokens), model(tokens))
