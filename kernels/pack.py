"""
Pack a 2:4 checkpoint into the compressed format of packed.py: each 2:4 weight becomes its kept values plus
2-bit positions (optionally 4-bit group-quantized values); every other file of the checkpoint is copied as it
is. checkpoint.load() reads the result back. Works everywhere (CPU included).

    python -m kernels.pack --ckpt DIR --out DIR2                      # exact: 2.125 bytes/weight in fp32
    python -m kernels.pack --ckpt DIR --out DIR2 --dtype bfloat16     # all float tensors cast first
    python -m kernels.pack --ckpt DIR --out DIR2 --bits 4 --group-size 128

Which weights: those named in the checkpoint's masks.safetensors, else the seven projections of every block
(model.PROJECTIONS). A weight that is not 2:4 sparse is refused with its name. The printed report counts
bytes per dense weight with the safetensors header charged to the packed weights.
"""
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

import checkpoint
import packed
from cli import DTYPES, DType, UserError, atomic_write, check_output_dir, cli_main, parse_config
from model import PROJECTIONS

# files of a checkpoint directory that the packed form replaces (masks = positions, recoverable)
REPLACED_FILES = {"model.safetensors", "masks.safetensors"}
# the 7 projections of every block, as state-dict names: the linears that 2:4 methods prune
PROJECTION = re.compile(r"^layers\.\d+\.(" + "|".join(map(re.escape, PROJECTIONS)) + r")\.weight$")


@dataclass
class PackConfig:
    """Pack a 2:4 checkpoint (our format) into compressed 2:4 storage."""
    ckpt: str = ""  # (required) a 2:4 checkpoint directory in our format (model.safetensors + params.json)
    out: str = ""  # (required) the packed checkpoint directory to write; must differ from --ckpt
    bits: Literal[0, 4] = 0  # 0: kept values stored exactly, in their dtype; 4: 4-bit group quantization
    group_size: int = 128  # kept values per quantization group (--bits 4)
    dtype: DType | None = None  # weight dtype all float tensors are cast to first; None keeps the checkpoint's
    overwrite: bool = False  # write into a non-empty --out (its model.safetensors and masks go: no mixed folder)


def check_paths(cfg: PackConfig) -> tuple[Path, Path]:
    """(ckpt, out) directories, or one line saying what is wrong; before any work."""
    if not cfg.ckpt:
        raise UserError("--ckpt is required: a 2:4 checkpoint directory in our format")
    if not cfg.out:
        raise UserError("--out is required: the directory to write the packed checkpoint to")
    ckpt, out = checkpoint.resolve(cfg.ckpt), Path(cfg.out)  # a name or a path, as everywhere
    if not (ckpt / "model.safetensors").is_file():
        raise UserError(f"--ckpt {cfg.ckpt}: no model.safetensors at {ckpt}; kernels.pack takes a 2:4 checkpoint "
                        f"in our format: prune first (python sparsity.py --ckpt {cfg.ckpt} --sparsity 2:4 --out DIR)")
    if out.resolve() == ckpt.resolve():
        raise UserError("--out must differ from --ckpt")
    check_output_dir(out, cfg.overwrite)
    return ckpt, out


# ----------------------------------------------------------------------------- sizes

def header_bytes(path) -> int:
    """Size of a safetensors file's header: 8-byte length + JSON (tensor table and metadata)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def expected_bytes(layout: dict, tensors: dict) -> dict:
    """The storage arithmetic, from shapes alone: bytes of packed parts and of dense tensors."""
    packed_bytes = dense = 0
    for name, e in layout.items():
        out, n_in = e["shape"]
        kept = out * n_in // 2
        packed_bytes += (kept + 3) // 4  # positions: 2 bits each
        if "bits" not in e:
            packed_bytes += kept * getattr(torch, e["dtype"]).itemsize
        else:
            n_groups = -(-(n_in // 2) // e["group_size"])
            packed_bytes += (kept + 1) // 2 + out * n_groups * 2 * 2  # codes: 4 bits each; fp16 scale + min
    for name, t in tensors.items():
        if name.rsplit(".", 1)[0] not in layout:
            dense += t.numel() * t.element_size()
    return {"packed": packed_bytes, "dense": dense}


# ----------------------------------------------------------------------------- the command

def pack_checkpoint(cfg: PackConfig) -> dict:
    ckpt, out = check_paths(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    state = checkpoint.read_safetensors(ckpt / "model.safetensors")
    if cfg.dtype:
        state = {k: v.to(DTYPES[cfg.dtype]) if v.is_floating_point() else v for k, v in state.items()}
    masks = checkpoint.load_masks(ckpt)
    names = [m + ".weight" for m in masks] if masks else [k for k in state if PROJECTION.match(k)]
    if not names:
        raise UserError(f"--ckpt {ckpt}: no masks.safetensors and no layers.N projection weights to pack")
    tensors, layout = packed.pack_state_dict(state, names, masks, cfg.bits, cfg.group_size)
    for name in REPLACED_FILES:  # --overwrite of an old checkpoint: load() must not read its dense weights
        (out / name).unlink(missing_ok=True)
    packed.save_packed(tensors, layout, out / packed.PACKED_FILE)
    for f in sorted(ckpt.iterdir()):  # params.json, tokenizer files, meta.json: copied as they are
        if f.is_file() and f.name not in REPLACED_FILES:
            atomic_write(out / f.name, lambda p, f=f: shutil.copyfile(f, p))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0  # CPU time: robust to a busy machine
    # report: bytes per dense weight, header (tensor table + layout metadata) charged to the packed weights
    file_bytes = (out / packed.PACKED_FILE).stat().st_size
    header = header_bytes(out / packed.PACKED_FILE)
    sizes = expected_bytes(layout, tensors)
    n_packed = sum(e["shape"][0] * e["shape"][1] for e in layout.values())
    n_all = n_packed + sum(t.numel() for k, t in tensors.items() if k.rsplit(".", 1)[0] not in layout)
    fp32_bytes = 4 * n_all
    report = {"seconds": seconds, "cpu_seconds": cpu_seconds, "file_bytes": file_bytes, "header_bytes": header,
              "packed_bytes": sizes["packed"], "dense_bytes": sizes["dense"],
              "n_packed_weights": n_packed, "n_weights": n_all,
              "packed_bytes_per_weight": (sizes["packed"] + header) / n_packed,
              "file_bytes_per_weight": file_bytes / n_all,
              "linear_compression_vs_fp32": 4 * n_packed / (sizes["packed"] + header),
              "model_compression_vs_fp32": fp32_bytes / file_bytes}
    print(f"packed {len(layout)} 2:4 weights ({n_packed / 1e6:.1f}M) into {out / packed.PACKED_FILE} "
          f"({file_bytes / 1e6:.2f} MB) in {seconds:.1f}s ({cpu_seconds:.1f}s CPU); 2:4 linears "
          f"{report['packed_bytes_per_weight']:.4f} bytes/weight ({report['linear_compression_vs_fp32']:.2f}x vs "
          f"fp32, header counted); whole file {report['file_bytes_per_weight']:.4f} bytes/weight "
          f"({report['model_compression_vs_fp32']:.2f}x vs fp32)")
    return report


def main(argv=None) -> dict:
    return pack_checkpoint(parse_config(PackConfig, argv))


if __name__ == "__main__":
    cli_main(main)
