"""
The compressed storage format of 2:4 sparse checkpoints; works everywhere (CPU included).

A 2:4 weight W (out, in) keeps at most 2 nonzeros in every group of 4 consecutive inputs of a row.
We store, per weight:
  values     (out, in/2)  the 2 kept values of every group, in order, in the weight's dtype
  positions  uint8        where the 2 kept values sit in their group of 4, in one of two codes:
    "pattern" (the default): a group's 2 positions are one of C(4,2) = 6 patterns, (0,1) (0,2) (0,3) (1,2)
              (1,3) (2,3) = codes 0..5; three groups' codes c0, c1, c2 make one byte c0 + 6 c1 + 36 c2 < 216
              (2.67 bits per group of 4; row-major over the (out, in/4) groups, the last byte padded with 0s);
    "2bit":   each kept value's position (0..3) in 2 bits, 4 per byte (little end first), row-major over
              `values` (4 bits per group; the only code of version-1 files)
and unpack exactly: zeros(out, in/4, 4).scatter_(2, positions, values).
Optionally (--bits 4) the kept values are quantized asymmetrically in groups of `group_size` consecutive
kept values of a row (128 kept values = 256 inputs; the last group of a row may be shorter):
  codes  uint8 (two 4-bit codes per byte)   q = round((v - min) / scale), q in 0..15
  scales fp16 (out, n_groups), mins fp16 (out, n_groups)   v_hat = min + q * scale
min is rounded down and scale up to fp16 so that every value of the group lies in [min, min + 15 scale]:
the error of every kept value is then at most scale / 2 (the bound the tests check); zeros stay exact.
The grid may also come from outside (GPTQ, obs.py): codes are then the grid points its values already are.

Bytes per dense weight (positions, pattern code: 1/12 byte per weight; 2-bit code: 1/8):
  fp32 values 0.5*4 + 1/12 = 2.0833 (1.92x vs fp32); bf16 values 1.0833 (3.69x);
  4-bit, group 128: 0.25 + 1/12 + 4/256 = 0.3490 (11.46x vs fp32; 2-bit positions: 0.3906, 10.24x); a short
  last group in a row costs a whole scale and min (SmolLM2's 576 inputs: 0.3529, 11.34x).
Tensors that are not packed (embeddings, norms, a dense output layer) are stored as they are.

File: packed.safetensors; its metadata holds "format", "version" (2; version-1 files, all 2-bit positions,
are read too) and "layout" (JSON: for every packed weight its shape, dtype and position code, plus bits and
group_size when quantized). Tensor names: "<weight name>.values" or ".codes/.scales/.mins", and
"<weight name>.positions".

checkpoint.load() reads a directory holding packed.safetensors; `python -m kernels24.pack` writes one.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import UserError, atomic_write

FORMAT = "sparsellama-packed-2:4"
VERSION = "2"
READS = ("1", "2")  # version 1: 2-bit positions only, no "positions" in the layout
POSITIONS = ("pattern", "2bit")  # the position codes; the first is the default
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


# ----------------------------------------------------------------------------- pattern codes

PATTERNS = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])  # code -> the 2 positions, ascending
_CODE = torch.full((16,), -1, dtype=torch.uint8)  # 4 * first + second -> code
_CODE[PATTERNS[:, 0] * 4 + PATTERNS[:, 1]] = torch.arange(6, dtype=torch.uint8)


def pack_patterns(pos: torch.Tensor) -> torch.Tensor:
    """(..., 2) ascending positions of every group -> uint8, three groups' codes per byte (c0 + 6 c1 + 36 c2)."""
    codes = _CODE[(pos[..., 0] * 4 + pos[..., 1]).reshape(-1)].long()
    pad = (-codes.numel()) % 3
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, 3)
    return (codes[:, 0] + 6 * codes[:, 1] + 36 * codes[:, 2]).to(torch.uint8)


def unpack_patterns(packed: torch.Tensor, n_groups: int, name: str = "weight") -> torch.Tensor:
    """Inverse of pack_patterns: (n_groups, 2) positions as int64."""
    b = packed.reshape(-1).long()
    if b.numel() != -(-n_groups // 3) or (b >= 216).any():  # 6**3 codes: a larger byte is no pattern
        raise UserError(f"{name}: its pattern-coded positions are corrupt ({b.numel()} bytes for {n_groups} "
                        "groups, or a byte >= 216); re-pack it")
    codes = torch.stack([b % 6, b // 6 % 6, b // 36], dim=1).reshape(-1)[:n_groups]
    return PATTERNS[codes]


# ----------------------------------------------------------------------------- one weight

def slots(keep: torch.Tensor) -> torch.Tensor:
    """(out, in/4, 2) ascending positions stored for every group of a keep indicator (out, in/4, 4): the kept
    ones first, then (for groups with < 2 kept) the lowest free ones."""
    score = keep.to(torch.int8) * 4 + torch.arange(3, -1, -1, dtype=torch.int8)
    return score.topk(2, dim=-1).indices.sort(dim=-1).values


def slot_mask(keep: torch.Tensor) -> torch.Tensor:
    """The (out, in) bool mask of the entries the packed form stores: exactly 2 of every 4 (GPTQ's keep)."""
    out, groups, _ = keep.shape
    mask = torch.zeros(keep.shape, dtype=torch.bool, device=keep.device)
    return mask.scatter_(2, slots(keep), True).view(out, groups * 4)


def pack_weight(weight: torch.Tensor, keep: torch.Tensor, code: str = POSITIONS[0]):
    """(values (out, in/2), packed positions uint8) of a 2:4 weight; keep = check_2to4(...); code: a POSITIONS."""
    out, n_in = weight.shape
    pos = slots(keep)  # (out, in/4, 2), distinct, ascending
    values = weight.reshape(out, n_in // 4, 4).gather(2, pos).reshape(out, n_in // 2)
    return values.contiguous(), (pack_patterns(pos) if code == "pattern" else pack_bits(pos, 2))


def unpack_weight(values: torch.Tensor, positions: torch.Tensor, shape, code: str = POSITIONS[0],
                  name: str = "weight") -> torch.Tensor:
    """Exact inverse of pack_weight."""
    out, n_in = shape
    if code == "pattern":
        pos = unpack_patterns(positions, out * n_in // 4, name).view(out, n_in // 4, 2)
    else:
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


def grid4(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, mins) in fp16 of 4-bit grids holding [lo, hi]: min rounded down and scale up to fp16, so
    every value lies in [min, min + 15 * scale]."""
    mins = lo.half()
    down = mins.float() > lo
    mins[down] = torch.nextafter(mins[down], torch.tensor(float("-inf"), dtype=torch.float16))
    scales = ((hi - mins.float()) / 15).half()
    up = mins.float() + 15 * scales.float() < hi
    while up.any():  # one step is nearly always enough; rounding of the check itself may need another
        scales[up] = torch.nextafter(scales[up], torch.tensor(float("inf"), dtype=torch.float16))
        up = mins.float() + 15 * scales.float() < hi
    return scales, mins


def snap4(v: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in 0..15, m + q * s): the nearest grid point; s, m are fp32 copies of the fp16 scale and min."""
    q = torch.where(s > 0, torch.round((v - m) / s.clamp_min(1e-30)), 0.0).clamp_(0, 15)
    return q, m + q * s  # the same fp32 ops as dequantize4: a value GPTQ leaves on the grid unpacks bit for bit


def quantize4(values: torch.Tensor, group_size: int, grid=None):
    """Asymmetric 4-bit group quantization of (rows, n) kept values -> (codes uint8, scales fp16, mins fp16).
    grid: (scales, mins) to use instead of each group's own min and max (GPTQ's)."""
    rows, n = values.shape
    g = _group(values.float(), group_size)
    scales, mins = grid4(g.amin(-1), g.amax(-1)) if grid is None else grid
    q = snap4(g, scales.float().unsqueeze(-1), mins.float().unsqueeze(-1))[0]
    return pack_bits(q.view(rows, -1)[:, :n], 4), scales, mins


def dequantize4(codes, scales, mins, shape, group_size: int, dtype=torch.float32) -> torch.Tensor:
    rows, n = shape
    n_groups = scales.shape[1]
    q = unpack_bits(codes, 4, rows * n).view(rows, n).float()
    q = torch.cat([q, q.new_zeros(rows, n_groups * group_size - n)], dim=1).view(rows, n_groups, group_size)
    v = mins.float().unsqueeze(-1) + q * scales.float().unsqueeze(-1)
    return v.view(rows, -1)[:, :n].to(dtype)


# ----------------------------------------------------------------------------- state dicts

def pack_state_dict(state: dict, names, masks: dict | None = None, bits: int = 0, group_size: int = 128,
                    positions: str = POSITIONS[0], grids: dict | None = None, dtype: torch.dtype | None = None):
    """Pack the 2:4 weights `names` of a state dict; others are kept as they are.
    positions: "pattern" or "2bit" (the module docstring). grids: {name: (scales, mins)} of weights whose 4-bit
    grid was chosen already (GPTQ; their kept values lie on it). dtype: the dtype packed weights unpack to
    (default: each weight's own). Returns (tensors for safetensors, layout dict for its metadata)."""
    if bits not in (0, 4):
        raise UserError(f"--bits {bits} is not supported; leave it out (values kept exactly) or use 4")
    if group_size < 1:
        raise UserError(f"--group-size {group_size} must be positive")
    if positions not in POSITIONS:
        raise UserError(f"--positions {positions!r}: choose one of {', '.join(POSITIONS)}")
    if grids and bits != 4:
        raise UserError("a precomputed 4-bit grid (GPTQ) needs --bits 4")
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
        values, tensors[name + ".positions"] = pack_weight(w, check_2to4(name, w, mask), positions)
        entry = {"shape": list(w.shape), "dtype": str(dtype or w.dtype).removeprefix("torch."), "positions": positions}
        if bits == 0:
            tensors[name + ".values"] = values.to(dtype or w.dtype)
        else:
            grid = grids.get(name) if grids else None
            n_groups = -(-values.shape[1] // group_size)
            if grid is not None and tuple(grid[0].shape) != (values.shape[0], n_groups):
                raise UserError(f"{name}: its 4-bit grid has shape {tuple(grid[0].shape)}, not (rows, groups of "
                                f"{group_size} kept values) = {(values.shape[0], n_groups)}")
            codes, scales, mins = quantize4(values, group_size, grid)
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
        code = e.get("positions", "2bit")  # version-1 layouts have no "positions": all 2-bit
        state[name] = unpack_weight(values, tensors[name + ".positions"], (out, n_in), code, name)
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
                        "write it with python -m kernels24.pack")
    if meta.get("version") not in READS:
        raise UserError(f"{path}: packed format version {meta.get('version')} is not one this code reads "
                        f"({', '.join(READS)}); re-pack it")
    layout = json.loads(meta["layout"])
    for name, e in layout.items():
        if meta["version"] == "1":  # written before pattern codes: every position in 2 bits
            e["positions"] = "2bit"
        if e.get("positions") not in POSITIONS:
            raise UserError(f"{path}: {name} has position code {e.get('positions')!r}, not one of "
                            f"{', '.join(POSITIONS)}; re-pack it")
    return tensors, layout


def load_packed_state_dict(path) -> dict[str, torch.Tensor]:
    """Dense state dict (our names, float tensors, pruned entries exactly zero) of a packed checkpoint."""
    return unpack_state_dict(*read_packed(path))
