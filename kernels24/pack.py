"""
Pack a 2:4 checkpoint into the compressed format of packed.py: each 2:4 weight becomes its kept values plus
their positions (pattern-coded by default, --positions 2bit for the older code), optionally 4-bit
group-quantized values; every other file of the checkpoint is copied as it is. checkpoint.load() reads the
result back. Works everywhere (CPU included).

    python -m kernels24.pack --ckpt DIR --out DIR2                      # exact: 2.083 bytes/weight in fp32
    python -m kernels24.pack --ckpt DIR --out DIR2 --dtype bfloat16     # all float tensors cast first
    python -m kernels24.pack --ckpt DIR --out DIR2 --bits 4 --group-size 128                   # round to nearest
    python -m kernels24.pack --ckpt DIR --out DIR2 --bits 4 --quantizer gptq --nsamples 128 --calib-len 2048

--quantizer gptq (obs.gptq: GPTQ, Frantar et al. 2022, on the kept entries; pruned ones stay exactly 0) loads
the model, takes --nsamples C4 windows of --calib-len tokens (seed --seed) as sparsity.py does, and quantizes
block by block: block l is calibrated on the outputs of the already quantized blocks < l
(sparsity.calibrate_blocks); with --true-sequential, inside a block too, stage by stage: q,k,v, then o on
the quantized q,k,v's outputs, then w1,w3, then w2 (the official GPTQ's option). Its grids are written into
the same packed format as round-to-nearest's.

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
import obs
import packed
import sparsity
from cli import DTYPES, Device, DType, UserError, atomic_write, check_output_dir, cli_main, parse_config, resolve_device
from data import c4_paths, calibration_windows, resolve_data_dir
from model import PROJECTION_STAGES, PROJECTIONS

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
    quantizer: Literal["rtn", "gptq"] = "rtn"  # --bits 4: round to nearest, or GPTQ on calibration data
    positions: Literal["pattern", "2bit"] = "pattern"  # a 2-of-4 pattern code per group (3 a byte) or 2 bits a value
    dtype: DType | None = None  # weight dtype all float tensors are cast to first; None keeps the checkpoint's
    overwrite: bool = False  # write into a non-empty --out (its model.safetensors and masks go: no mixed folder)
    nsamples: int = 128  # GPTQ: calibration windows (C4, as sparsity.py)
    calib_len: int = 2048  # GPTQ: tokens per calibration window
    seed: int = 0  # GPTQ: calibration sampling seed
    blocksize: int = 128  # GPTQ column block
    percdamp: float = 0.01  # GPTQ damping, fraction of mean(diag H)
    act_order: bool = False  # GPTQ: walk the columns by decreasing H_jj, every grid fitted first (official --act-order)
    true_sequential: bool = False  # GPTQ: q,k,v → o → w1,w3 → w2, each on the quantized earlier ones' outputs
    data_dir: str | None = None  # GPTQ's C4: default ./data, then ../shared/data
    device: Device = "auto"  # GPTQ's calibration device (auto: cuda when torch sees a GPU)


def check_paths(cfg: PackConfig) -> tuple[Path, Path]:
    """(ckpt, out) directories, or one line saying what is wrong; before any work."""
    if not cfg.ckpt:
        raise UserError("--ckpt is required: a 2:4 checkpoint directory in our format")
    if not cfg.out:
        raise UserError("--out is required: the directory to write the packed checkpoint to")
    ckpt, out = checkpoint.resolve(cfg.ckpt), Path(cfg.out)  # a name or a path, as everywhere
    if not (ckpt / "model.safetensors").is_file():
        raise UserError(f"--ckpt {cfg.ckpt}: no model.safetensors at {ckpt}; kernels24.pack takes a 2:4 checkpoint "
                        f"in our format: prune first (python sparsity.py --ckpt {cfg.ckpt} --sparsity 2:4 --out DIR)")
    if out.resolve() == ckpt.resolve():
        raise UserError("--out must differ from --ckpt")
    if cfg.quantizer == "gptq":
        if cfg.bits != 4:
            raise UserError("--quantizer gptq quantizes to 4 bits: add --bits 4")
        if cfg.group_size % 2:  # 2 kept per group of 4 inputs: an odd group would end inside a group of 4
            raise UserError(f"--group-size {cfg.group_size}: GPTQ needs an even group size (a group of kept "
                            "values must end where a group of 4 inputs ends)")
        c4_paths(resolve_data_dir(cfg.data_dir))  # the calibration text is there, before any work
    elif cfg.act_order or cfg.true_sequential:
        flag = "--act-order" if cfg.act_order else "--true-sequential"
        raise UserError(f"{flag} is an option of GPTQ: add --quantizer gptq --bits 4")
    check_output_dir(out, cfg.overwrite)
    return ckpt, out


def check_group_size(cfg: PackConfig, state: dict, names: list) -> None:
    """--bits 4: a group holds at most one row's kept values (half its inputs); a larger one pads every row to the
    group (--group-size 1000000: minutes of work on padding)."""
    if cfg.bits != 4:
        return
    narrowest = min(names, key=lambda n: (state[n].shape[-1], n))
    kept = state[narrowest].shape[-1] // 2
    if cfg.group_size > kept:
        raise UserError(f"--group-size {cfg.group_size}: larger than the {kept} kept values of a row of {narrowest} "
                        f"(2 of every 4 of its {state[narrowest].shape[-1]} inputs); use at most {kept}")


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
        # positions: a pattern code per group of 4, three a byte; or 2 bits per kept value
        packed_bytes += -(-(kept // 2) // 3) if e["positions"] == "pattern" else (kept + 3) // 4
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
    masks = checkpoint.load_masks(ckpt)
    names = [m + ".weight" for m in masks] if masks else [k for k in state if PROJECTION.match(k)]
    if not names:
        raise UserError(f"--ckpt {ckpt}: no masks.safetensors and no layers.N projection weights to pack")
    check_group_size(cfg, state, names)
    grids, gptq_report = (gptq_weights(cfg, ckpt, state, names, masks) if cfg.quantizer == "gptq" else (None, {}))
    if cfg.dtype:  # GPTQ's weights stay fp32 until their codes are taken: they lie on fp32 grid points
        state = {k: v.to(DTYPES[cfg.dtype]) if v.is_floating_point() and not (grids and k in grids) else v
                 for k, v in state.items()}
    tensors, layout = packed.pack_state_dict(state, names, masks, cfg.bits, cfg.group_size, cfg.positions, grids,
                                             DTYPES[cfg.dtype] if cfg.dtype else None)
    # params.json, tokenizer files, meta.json are copied as they are; --overwrite: the old model's others go
    copied = [f for f in sorted(ckpt.iterdir()) if f.is_file() and f.name not in REPLACED_FILES]
    checkpoint.clear_model_files(out, keep=[packed.PACKED_FILE, *(f.name for f in copied)])
    packed.save_packed(tensors, layout, out / packed.PACKED_FILE)
    for f in copied:
        atomic_write(out / f.name, lambda p, f=f: shutil.copyfile(f, p))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0  # CPU time: robust to a busy machine
    # report: bytes per dense weight, header (tensor table + layout metadata) charged to the packed weights
    file_bytes = (out / packed.PACKED_FILE).stat().st_size
    header = header_bytes(out / packed.PACKED_FILE)
    sizes = expected_bytes(layout, tensors)
    n_packed = sum(e["shape"][0] * e["shape"][1] for e in layout.values())
    n_all = n_packed + sum(t.numel() for k, t in tensors.items() if k.rsplit(".", 1)[0] not in layout)
    fp32_bytes = 4 * n_all
    report = {**gptq_report, "seconds": seconds, "cpu_seconds": cpu_seconds, "file_bytes": file_bytes,
              "header_bytes": header,
              "packed_bytes": sizes["packed"], "dense_bytes": sizes["dense"],
              "n_packed_weights": n_packed, "n_weights": n_all,
              "packed_bytes_per_weight": (sizes["packed"] + header) / n_packed,
              "file_bytes_per_weight": file_bytes / n_all,
              "linear_compression_vs_fp32": 4 * n_packed / (sizes["packed"] + header),
              "model_compression_vs_fp32": fp32_bytes / file_bytes}
    how = f"{cfg.bits}-bit {cfg.quantizer} g{cfg.group_size}" if cfg.bits else "exact values"
    print(f"packed {len(layout)} 2:4 weights ({n_packed / 1e6:.1f}M; {how}, {cfg.positions} positions) into "
          f"{out / packed.PACKED_FILE} "
          f"({file_bytes / 1e6:.2f} MB) in {seconds:.1f}s ({cpu_seconds:.1f}s CPU); 2:4 linears "
          f"{report['packed_bytes_per_weight']:.4f} bytes/weight ({report['linear_compression_vs_fp32']:.2f}x vs "
          f"fp32, header counted); whole file {report['file_bytes_per_weight']:.4f} bytes/weight "
          f"({report['model_compression_vs_fp32']:.2f}x vs fp32)")
    return report


@torch.no_grad()
def gptq_weights(cfg: PackConfig, ckpt: Path, state: dict, names: list, masks: dict | None):
    """GPTQ every packed weight, block by block (sparsity.calibrate_blocks); state's packed weights become
    GPTQ's (fp32, on their grids). Returns ({weight name: (scales, mins)}, {"gptq_s", "gptq_forward_s"})."""
    for name in names:  # a weight that is not 2:4 fails now, not after the blocks before it are calibrated
        packed.check_2to4(name, state[name], masks.get(name.removesuffix(".weight")) if masks else None)
    device = resolve_device(cfg.device)
    model, tok = checkpoint.load(ckpt, device=device, dtype=torch.float32)
    linears = sparsity.prunable_linears(model)
    outside = [n for n in names if n.removesuffix(".weight") not in linears]
    if outside:
        raise UserError(f"--quantizer gptq walks the decoder blocks' projections; {outside[0]} is not one")
    targets = {n.removesuffix(".weight"): linears[n.removesuffix(".weight")] for n in names}
    calib = calibration_windows(tok, c4_paths(resolve_data_dir(cfg.data_dir)), cfg.nsamples, cfg.calib_len, cfg.seed)
    print(f"GPTQ calibration: {calib.shape[0]} windows x {calib.shape[1]} tokens of C4, seed {cfg.seed}", flush=True)

    def work(name, lin, hessian):  # the slots packed.py stores (exactly 2 of every 4) are the kept entries
        mask = masks.get(name) if masks else None
        keep = packed.slot_mask(packed.check_2to4(name + ".weight", lin.weight.cpu(), mask))
        new, scales, mins = obs.gptq(lin.weight, hessian, keep.to(device), 2 * cfg.group_size, cfg.blocksize,
                                     cfg.percdamp, name, cfg.act_order)
        lin.weight.copy_(new)
        return scales.cpu(), mins.cpu()

    report = {}
    stages = PROJECTION_STAGES if cfg.true_sequential else None
    grids = sparsity.calibrate_blocks(model, calib.to(device), targets, "hessian", work,
                                      f"gptq 4-bit g{cfg.group_size}", report, stages=stages)
    for name, lin in targets.items():
        state[name + ".weight"] = lin.weight.detach().cpu()
    times = {"gptq_s": report["total_s"], "gptq_forward_s": report["forward_s"]}
    return {n + ".weight": g for n, g in grids.items()}, times


def main(argv=None) -> dict:
    return pack_checkpoint(parse_config(PackConfig, argv))


if __name__ == "__main__":
    cli_main(main)
