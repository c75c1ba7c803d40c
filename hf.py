"""Hugging Face's Llama format: parameter names, config.json, Hub names, and the export transformers loads.

    args = model_args(json.load(open("config.json")), path)   # ModelArgs, or one error naming what we lack
    hub_snapshot("HuggingFaceTB/SmolLM2-135M")                  # its cached snapshot, downloaded when online
    export_hf(model, tokenizer, "out/final/hf")                 # config.json, model.safetensors, tokenizer files

The export holds tokenizer.json (and tokenizer.model for SentencePiece models), tokenizer_config.json and
generation_config.json in Hugging Face's schema, so AutoTokenizer and AutoModelForCausalLM load it as it is.
Reading the weights is checkpoint.py's (read_hf); tokenizer.json is read by tokenizer.load_tokenizer.
"""
import json
import re
from pathlib import Path

from safetensors.torch import save_file

from cli import UserError, atomic_write
from model import ModelArgs, Transformer
from packed import PACKED_FILE
from tokenizer import (CONTROL, LLAMA3_PATTERN, TOKENIZER_FILES, UNKNOWN, USER_DEFINED, Vocab, sentencepiece_merges,
                       vocab_of)

# every file our writers put in a model folder (ours, an hf/ export, a packed copy)
MODEL_FILES = ("params.json", "config.json", "model.safetensors", "masks.safetensors", "meta.json",
               PACKED_FILE) + TOKENIZER_FILES
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model"]  # not .bin or .pth copies
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


# ----------------------------------------------------------------------------- names

HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


def hf_name(name: str) -> str:
    """Our state-dict name -> Hugging Face's."""
    if name in HF_TOP:
        return HF_TOP[name]
    i, module = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name).groups()
    return f"model.layers.{i}.{HF_LAYER[module]}.weight"


OUR_TOP = {v: k for k, v in HF_TOP.items()}
OUR_LAYER = {v: k for k, v in HF_LAYER.items()}


def our_name(hf: str) -> str:
    """Hugging Face's state-dict name -> ours (unknown names come back unchanged, and build() reports them)."""
    if hf in OUR_TOP:
        return OUR_TOP[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf)
    return f"layers.{m.group(1)}.{OUR_LAYER[m.group(2)]}.weight" if m and m.group(2) in OUR_LAYER else hf


def hf_to_meta_rows(w, n_heads):
    """HF rotates halves (i, i + head_dim/2); Meta rotates interleaved pairs (2i, 2i+1): reorder q/k rows."""
    return w.view(n_heads, 2, w.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def meta_to_hf_rows(w, n_heads):
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- config.json

def unsupported(cfg: dict) -> list:
    """What in a config.json our Llama does not compute (empty if it is a plain Llama)."""
    found = []
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        found.append(f"model_type '{cfg.get('model_type')}'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            found.append(f"{key}=true (Qwen2-style biases)" if key == "attention_bias" else f"{key}=true")
    if cfg.get("sliding_window"):
        found.append(f"sliding_window={cfg['sliding_window']} (Mistral's sliding-window attention)")
    found += [f"{k}={cfg[k]} (mixture of experts)" for k in MOE_KEYS if (cfg.get(k) or 0) > 1]
    if cfg.get("hidden_act", "silu") != "silu":
        found.append(f"hidden_act '{cfg['hidden_act']}'")
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}  # transformers 5 says rope_parameters
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("llama3", "default"):
        found.append(f"rope_scaling type '{scaling.get('rope_type', scaling.get('type'))}'")
    return found


def model_args(cfg: dict, path) -> ModelArgs:
    """config.json -> ModelArgs, or one error line naming everything in it that we don't implement."""
    found = unsupported(cfg)
    if found:
        raise UserError(f"{path}: config.json needs what our Llama lacks: {'; '.join(found)}. "
                        f"Supported: Llama-architecture models (Llama 2/3, SmolLM2, TinyLlama, Mistral without "
                        f"a sliding window)")
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    scaling = ({k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
               if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else None)
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    try:
        return ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                         n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
                         vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                         head_dim=cfg.get("head_dim"), norm_eps=cfg["rms_norm_eps"], rope_theta=theta,
                         rope_scaling=scaling, max_seq_len=cfg.get("max_position_embeddings", 4096),
                         tie_embeddings=cfg.get("tie_word_embeddings", False))
    except KeyError as e:
        raise UserError(f"{path}: config.json lacks {e}; is this a Llama model's config?") from None


# ----------------------------------------------------------------------------- Hub names

def is_hub_name(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def hub_snapshot(name: str) -> Path:
    """The local snapshot of a Hub repository (config, safetensors, tokenizer files), downloaded when online."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"'{name}' is not a local path; to fetch it from the Hugging Face Hub: "
                        f"pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as online:  # offline, unknown or gated repository: the cache may still hold it
        try:
            return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True))
        except Exception:
            why = (str(online).strip().splitlines() or [""])[0][:160]
            raise UserError(f"'{name}' is neither a local path nor in the Hugging Face cache, and downloading it "
                            f"failed ({type(online).__name__}: {why}); download it where there is network "
                            f"(hf download {name}) or pass --ckpt DIR") from None


# ----------------------------------------------------------------------------- the tokenizer files of an export

def tokenizer_json(vocab: Vocab) -> dict:
    """Hugging Face's tokenizer.json for a vocabulary: the `tokenizers` library gives our ids with it."""
    special = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                    special=vocab.token_types[i] != USER_DEFINED)
               for i, t in enumerate(vocab.tokens) if vocab.token_types[i] in (CONTROL, USER_DEFINED, UNKNOWN)]
    in_model = {t: i for i, t in enumerate(vocab.tokens)}  # specials too: `tokenizers` misnumbers them otherwise
    bos = vocab.tokens[vocab.bos_id]
    post = None if not vocab.add_bos else dict(
        type="TemplateProcessing",
        single=[{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        pair=[{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
              {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        special_tokens={bos: dict(id=bos, ids=[vocab.bos_id], tokens=[bos])})
    if vocab.model == "gpt2":
        byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True)
        pattern = LLAMA3_PATTERN if vocab.pre == "llama-bpe" else vocab.pattern  # any other regex: Split by it
        pre = {"gpt2": byte_level,
               "smollm": dict(type="Sequence", pretokenizers=[dict(type="Digits", individual_digits=True), byte_level]),
               }.get(vocab.pre) or (pattern and dict(type="Sequence", pretokenizers=[
                   dict(type="Split", pattern={"Regex": pattern}, behavior="Isolated", invert=False),
                   byte_level | dict(use_regex=False)]))
        if not pre:
            raise ValueError(f"no tokenizer.json pre-tokenizer for '{vocab.pre}' (known: gpt2, smollm, llama-bpe)")
        model = dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
                     fuse_unk=False, byte_fallback=False, ignore_merges=True, vocab=in_model,
                     merges=[m.split(" ") for m in vocab.merges])  # ignore_merges: tiktoken's whole-piece lookup
        return dict(version="1.0", truncation=None, padding=None, added_tokens=special, normalizer=None,
                    pre_tokenizer=pre, post_processor=post, decoder=byte_level, model=model)
    merges = vocab.merges if vocab.merges is not None else sentencepiece_merges(vocab)
    unk = next((t for t, typ in zip(vocab.tokens, vocab.token_types) if typ == UNKNOWN), None)
    model = dict(type="BPE", dropout=None, unk_token=unk, continuing_subword_prefix=None, end_of_word_suffix=None,
                 fuse_unk=True, byte_fallback=True, ignore_merges=False, vocab=in_model,
                 merges=[m.split(" ") for m in merges])
    decoder = dict(type="Sequence", decoders=[
        dict(type="Replace", pattern={"String": "▁"}, content=" "), dict(type="ByteFallback"), dict(type="Fuse"),
        dict(type="Strip", content=" ", start=1, stop=0)])
    # Prepend + Replace as a normaliser, not Metaspace: Metaspace adds no "▁" to a text that starts with a space,
    # SentencePiece does
    normalizer = dict(type="Sequence", normalizers=[dict(type="Prepend", prepend="▁"),
                                                    dict(type="Replace", pattern={"String": " "}, content="▁")])
    return dict(version="1.0", truncation=None, padding=None, added_tokens=special, normalizer=normalizer,
                pre_tokenizer=None, post_processor=post, decoder=decoder, model=model)


def tokenizer_config(vocab: Vocab) -> dict:
    """tokenizer_config.json in Hugging Face's schema: the generic fast tokenizer reads tokenizer.json as written."""
    unk = next((t for t, k in zip(vocab.tokens, vocab.token_types) if k == UNKNOWN), None)
    return dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=vocab.tokens[vocab.bos_id],
                eos_token=vocab.tokens[vocab.eos_id], unk_token=unk, add_bos_token=vocab.add_bos, add_eos_token=False,
                clean_up_tokenization_spaces=False, model_max_length=1_000_000)


def clear_model_files(out: Path, keep=()) -> None:
    """Before a writer fills `out` (--overwrite): remove what an earlier model left there, but the files in `keep`
    (which the writer replaces atomically). load() would read its params.json, masks or tokenizer with the new model."""
    for name in set(MODEL_FILES) - set(keep):
        (out / name).unlink(missing_ok=True)


def save_tokenizer(tokenizer, out: Path):
    """tokenizer.json, tokenizer_config.json, generation_config.json (the files a Hugging Face directory we read
    came with, else written from vocab_of), and tokenizer.model for SentencePiece. tokenizer_class is always the
    generic PreTrainedTokenizerFast, which encodes as tokenizer.json says."""
    files = dict(tokenizer.hf_files)
    if "tokenizer_config.json" in files:  # transformers 5's LlamaTokenizer class swaps the file's normaliser for
        config = json.loads(files["tokenizer_config.json"])  # its own Metaspace: the generic class keeps it
        files["tokenizer_config.json"] = json.dumps(config | {"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2)
    if "tokenizer.json" not in files:
        vocab = vocab_of(tokenizer)
        files["tokenizer.json"] = json.dumps(tokenizer_json(vocab), ensure_ascii=False)
        files.setdefault("tokenizer_config.json", json.dumps(tokenizer_config(vocab), indent=2))
    stop = list(tokenizer.stop_ids)
    generation = dict(bos_token_id=tokenizer.bos_id, eos_token_id=stop[0] if len(stop) == 1 else stop)
    files.setdefault("generation_config.json", json.dumps(generation, indent=2))
    for name, text in files.items():
        atomic_write(out / name, lambda p, text=text: Path(p).write_text(text))
    if tokenizer.kind == "sentencepiece":
        atomic_write(out / "tokenizer.model", lambda p: Path(p).write_bytes(tokenizer.model_bytes))


# ----------------------------------------------------------------------------- export

def export_hf(model: Transformer, tokenizer, out_dir):
    """config.json + model.safetensors in Hugging Face's Llama layout and the tokenizer's Hugging Face files:
    transformers loads the directory, and so does checkpoint.load."""
    a = model.args
    if a.slorb_k:
        raise UserError("this model has SLoRB branches, which Hugging Face's Llama cannot hold: keep it in our format")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_model_files(out, keep=["model.safetensors"])
    state = {}
    for k, v in model.state_dict().items():
        if a.tie_embeddings and k == "output.weight":
            continue
        if k.endswith("attention.wq.weight"):
            v = meta_to_hf_rows(v, a.n_heads)
        elif k.endswith("attention.wk.weight"):
            v = meta_to_hf_rows(v, a.n_kv_heads)
        state[hf_name(k)] = v.detach().contiguous().cpu()
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=a.dim,
                  num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                  head_dim=a.head_dim, intermediate_size=a.hidden_dim, vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps,
                  rope_theta=a.rope_theta, rope_scaling=dict(rope_type="llama3", **a.rope_scaling) if a.rope_scaling else None,
                  max_position_embeddings=a.max_seq_len, tie_word_embeddings=a.tie_embeddings, hidden_act="silu",
                  attention_bias=False, mlp_bias=False, torch_dtype=str(next(iter(state.values())).dtype).split(".")[-1],
                  bos_token_id=getattr(tokenizer, "bos_id", None), eos_token_id=getattr(tokenizer, "eos_id", None))
    atomic_write(out / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
