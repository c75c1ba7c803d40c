"""
The compressed storage format of 2:4 sparse checkpoints; works everywhere (CPU included).

A 2:4 weight W (out, in) keeps at most 2 nonzeros in every group of 4 consecutive inputs of a row.
We store, per weight:
  values     (out, in/2)  the 2 kept values of every group, in order, in the weight's dtype
  positions  uint8        the position (0..3) of each kept value inside its group, 2 bits each,
                          4 per byte (little end first), flattened in row-major order of `values`
and unpack exactly: zeros(out, in/4, 4).scatter_(2, positions, values).
Optionally (--bits 4) the kept values are quantized asymmetrically in groups of `group_size` consecutive
kept values of a row (128 kept values = 256 inputs; the last group of a row may be shorter):
  codes  uint8 (two 4-bit codes per byte)   q = round((v - min) / scale), q in 0..15
  scales fp16 (out, n_groups), mins fp16 (out, n_groups)   v_hat = min + q * scale
min is rounded down and scale up to fp16 so that every value of the group lies in [min, min + 15 scale]:
the error of every kept value is then at most scale / 2 (the bound the tests check); zeros stay exact.

Bytes per dense weight (positions: 2 bits per kept value = 1 bit per weight):
  fp32 values 0.5*4 + 0.125 = 2.125 (1.88x vs fp32); bf16 values 1.125 (3.56x);
  4-bit, group 128: 0.25 + 0.125 + 4/256 = 0.390625 (10.24x vs fp32).
Tensors that are not packed (embeddings, norms, a dense output layer) are stored as they are.

File: packed.safetensors; its metadata holds "format", "version" and "layout" (JSON: for every packed
weight its shape and dtype, plus bits and group_size when quantized). Tensor names: "<weight name>.values" or ".codes/.scales/.mins",
and "<weight name>.positions".

checkpoint.load() reads a directory holding packed.safetensors; `python -m kernels.pack` writes one.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import UserError, atomic_write

FORMAT = "sparsellama-packed-2:4"
VERSION = "1"
PACKED_FILE = "packed.safetensors"


# ----------------------------------------------------------------------------- 2:4 check

def check_2to4(name: str, weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Return the kept-entry indicator (out, in/4, 4) of a 2:4 weight; UserError naming the layer if not 2:4."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        raise UserError(f"{name}: shape {tuple(weight.shape)} is not 2-D with inputs a multiple of 4, "
                        "so it cannot be 2:4 packed; leave it out of the masks")
    out, n_in = weight.shape
    keep = weight.reshape(out, n_in // 4, 4) != 0
    if mask is not None:
        if mask.shape != weight.shape:
            raise UserError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
        mask = mask.reshape(out, n_in // 4, 4).bool()
        if (keep & ~mask).any():
            raise UserError(f"{name}: the weight has nonzeros outside its mask; apply the mask before packing")
        keep = mask
    bad = int((keep.sum(-1) > 2).sum())
    if bad:
        raise UserError(f"{name}: not 2:4 sparse ({bad} of {keep.shape[0] * keep.shape[1]} groups of 4 "
                        "have more than 2 nonzeros); prune it to 2:4 first (sparsity.py) or leave it dense")
    return keep


# ----------------------------------------------------------------------------- bit packing

def pack_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small non-negative integers (< 2**bits) into uint8, 8 // bits per byte, first value in the low bits."""
    per = 8 // bits
    flat = x.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.view(-1, per)
    out = flat[:, 0].clone()
    for j in range(1, per):
        out |= flat[:, j] << (bits * j)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n values as int64."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    x = (packed.reshape(-1, 1) >> shifts) & (2 ** bits - 1)
    return x.reshape(-1)[:n].long()


# ----------------------------------------------------------------------------- one weight

def pack_weight(weight: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2), packed positions uint8) of a 2:4 weight; keep = check_2to4(...)."""
    out, n_in = weight.shape
    # choose 2 positions per group: the kept ones first, then (for groups with < 2 kept) the lowest free ones
    score = keep.to(torch.int8) * 4 + torch.arange(3, -1, -1, dtype=torch.int8)
    pos = score.topk(2, dim=-1).indices.sort(dim=-1).values  # (out, in/4, 2), distinct, ascending
    values = weight.reshape(out, n_in // 4, 4).gather(2, pos).reshape(out, n_in // 2)
    return values.contiguous(), pack_bits(pos, 2)


def unpack_weight(values: torch.Tensor, positions: torch.Tensor, shape) -> torch.Tensor:
    """Exact inverse of pack_weight."""
    out, n_in = shape
    pos = unpack_bits(positions, 2, out * n_in // 2).view(out, n_in // 4, 2)
    dense = values.new_zeros(out, n_in // 4, 4)
    return dense.scatter_(2, pos, values.reshape(out, n_in // 4, 2)).view(out, n_in)


def _group(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, n) -> (rows, n_groups, group_size); the last group is padded with its row's last value,
    which leaves every group's min and max unchanged."""
    rows, n = values.shape
    pad = (-n) % group_size
    if pad:
        values = torch.cat([values, values[:, -1:].expand(rows, pad)], dim=1)
    return values.view(rows, -1, group_size)


def quantize4(values: torch.Tensor, group_size: int):
    """Asymmetric 4-bit group quantization of (rows, n) kept values -> (codes uint8, scales fp16, mins fp16)."""
    rows, n = values.shape
    g = _group(values.float(), group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    # min rounded down and scale rounded up to fp16, so every value lies in [min, min + 15 * scale]
    mins = lo.half()
    down = mins.float() > lo
    mins[down] = torch.nextafter(mins[down], torch.tensor(float("-inf"), dtype=torch.float16))
    scales = ((hi - mins.float()) / 15).half()
    up = mins.float() + 15 * scales.float() < hi
    while up.any():  # one step is nearly always enough; rounding of the check itself may need another
        scales[up] = torch.nextafter(scales[up], torch.tensor(float("inf"), dtype=torch.float16))
        up = mins.float() + 15 * scales.float() < hi
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round((g - mins.float().unsqueeze(-1)) / s.clamp_min(1e-30)), 0.0)
    q = q.clamp_(0, 15).view(rows, -1)[:, :n]
    return pack_bits(q, 4), scales, mins


def dequantize4(codes, scales, mins, shape, group_size: int, dtype=torch.float32) -> torch.Tensor:
    rows, n = shape
    n_groups = scales.shape[1]
    q = unpack_bits(codes, 4, rows * n).view(rows, n).float()
    q = torch.cat([q, q.new_zeros(rows, n_groups * group_size - n)], dim=1).view(rows, n_groups, group_size)
    v = mins.float().unsqueeze(-1) + q * scales.float().unsqueeze(-1)
    return v.view(rows, -1)[:, :n].to(dtype)


# ----------------------------------------------------------------------------- state dicts

def pack_state_dict(state: dict, names, masks: dict | None = None, bits: int = 0, group_size: int = 128):
    """Pack the 2:4 weights `names` of a state dict; others are kept as they are.
    Returns (tensors for safetensors, layout dict for its metadata)."""
    if bits not in (0, 4):
        raise UserError(f"--bits {bits} is not supported; leave it out (values kept exactly) or use 4")
    if group_size < 1:
        raise UserError(f"--group-size {group_size} must be positive")
    tensors, layout = {}, {}
    names = set(names)
    missing = names - set(state)
    if missing:
        raise UserError(f"weights to pack not in the checkpoint: {sorted(missing)[:3]}")
    for name, w in state.items():
        if name not in names:
            tensors[name] = w.contiguous()
            continue
        mask = masks.get(name.removesuffix(".weight")) if masks else None
        values, positions = pack_weight(w, check_2to4(name, w, mask))
        entry = {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")}
        tensors[name + ".positions"] = positions
        if bits == 0:
            tensors[name + ".values"] = values
        else:
            codes, scales, mins = quantize4(values, group_size)
            tensors.update({name + ".codes": codes, name + ".scales": scales, name + ".mins": mins})
            entry.update(bits=bits, group_size=group_size)
        layout[name] = entry
    return tensors, layout


def unpack_state_dict(tensors: dict, layout: dict) -> dict:
    state = {}
    for name, t in tensors.items():
        base = name.rsplit(".", 1)[0]
        if base not in layout:
            state[name] = t
    for name, e in layout.items():
        out, n_in = e["shape"]
        if "bits" not in e:
            values = tensors[name + ".values"]
        else:
            values = dequantize4(tensors[name + ".codes"], tensors[name + ".scales"], tensors[name + ".mins"],
                                 (out, n_in // 2), e["group_size"], getattr(torch, e["dtype"]))
        state[name] = unpack_weight(values, tensors[name + ".positions"], (out, n_in))
    return state


def save_packed(tensors: dict, layout: dict, path) -> None:
    """Write packed.safetensors atomically (temp file, then os.replace)."""
    path = Path(path)
    meta = {"format": FORMAT, "version": VERSION, "layout": json.dumps(layout, separators=(",", ":"))}
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


def read_packed(path) -> tuple[dict, dict]:
    """(tensors, layout) of a packed file or of a directory holding packed.safetensors."""
    path = Path(path)
    if path.is_dir():
        path = path / PACKED_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for missing, truncated or corrupt files
        raise UserError(f"cannot read {path}: {e}; the file is missing, truncated or corrupt") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a packed 2:4 file (metadata format {meta.get('format')!r}); "
                        "write it with python -m kernels.pack")
    if meta.get("version") != VERSION:
        raise UserError(f"{path}: packed format version {meta.get('version')} is not {VERSION}; re-pack it")
    return tensors, json.loads(meta["layout"])


def load_packed_state_dict(path) -> dict[str, torch.Tensor]:
    """Dense state dict (our names, float tensors, pruned entries exactly zero) of a packed checkpoint."""
    return unpack_state_dict(*read_packed(path))
