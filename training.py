"""Training machinery shared by train_ast.py and train_pat.py, in the order a trainer uses it.

The config both trainers extend (flags via cli.parse_config), distributed setup (torchrun: nccl on GPU, gloo
on CPU), the compute dtype, the LR schedule, wrapping the model for training (FSDP with bf16 gathers on GPU, DDP,
torch.compile), gradient sync once per accumulation step, weight decay on matrices only, FSDP shard helpers and
packed bool masks, resumable state (atomic, weights_only, RNG included, FSDP gathered in full), a JSONL log with a
PNG plot, a NaN stop and the teardown. The data side (token windows, instruction batches) lives in data.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from cli import DTYPES, Device, DiskFull, UserError, atomic_write, disk_full, release_locks, resolve_device


@dataclass
class TrainArgs:
    ckpt: str = "smollm2-135m"  # model name or checkpoint path (checkpoint.load)
    data_dir: str | None = None  # default: ./data, else ../shared/data
    out: str = "out/train"  # run directory: state.pt, log.jsonl, log.png, final/
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 512  # training window length in tokens
    lr: float = 2e-5  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine ends at min_lr_ratio * lr
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    device: Device = "auto"  # auto: cuda if torch sees a GPU, else cpu
    autocast: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # compute dtype; auto: bfloat16 on GPU, float32 on CPU
    seed: int = 0  # model init, data order
    ckpt_interval: int = 500  # steps between resumable checkpoints; 0: only at the end
    eval: bool = True  # WikiText-2 perplexity at the start, every --eval-interval steps and at the end
    eval_interval: int = 500  # steps between perplexity evals; 0: only at the start and the end
    ppl_windows: int = 16  # WikiText-2 windows per perplexity eval; 0: the whole test set
    ppl_seq_len: int = 512  # WikiText-2 window length
    log_interval: int = 10  # steps between progress lines
    compile: bool = False  # torch.compile the model being trained
    resume: bool = False  # continue the run in --out from its state.pt
    overwrite: bool = False  # start over in a --out that holds a run (deletes its state.pt, log.jsonl, log.png, final/)


def setup_distributed(device="auto"):
    """(rank, world_size, local_rank, device): torchrun's env (nccl on CUDA, gloo on CPU) or one process."""
    device = resolve_device(device)
    if "RANK" not in os.environ:
        return 0, 1, 0, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device(f"cuda:{local_rank}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, local_rank, device


def autocast_dtype(name: str, device) -> torch.dtype:
    """The compute dtype of --autocast: `auto` is bfloat16 on GPU and float32 on CPU."""
    if name == "auto":
        name = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return DTYPES[name]


def lr_at(step: int, args) -> float:
    """Linear warmup to args.lr over warmup_steps, then cosine down to min_lr_ratio * lr at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    min_lr = args.min_lr_ratio * args.lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - min_lr)


# ----------------------------------------------------------------------------- the model as it trains


def fsdp_shard(model, device, world_size, param_dtype=None):
    """FSDP2 in place: each block is one unit, then the rest; moves this rank's shards to the device.
    param_dtype (bf16 on GPU): the gathered weights the forward and backward use, gradients reduced in fp32; the
    sharded weights and optimizer state stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap(model, device, world_size, fsdp=False, compile=False, dtype=torch.float32):
    """What the training step calls: the model FSDP-sharded (in place; bf16 gathers when the compute dtype is bf16
    on GPU), DDP-wrapped with more than one process, or as it is; compiled in place with --compile. The caller
    keeps `model` for its state."""
    if fsdp:
        low = dtype if dtype != torch.float32 and device.type == "cuda" else None
        net = fsdp_shard(model, device, world_size, param_dtype=low)
    else:
        model.to(device)
        net = model
        if world_size > 1:  # buffers (masks) are computed identically on every rank: no broadcast
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if compile:
        net.compile()
    return net


def grad_sync(net, enabled: bool):
    """Context for one micro-batch: gradients are reduced across ranks only when `enabled` (the last micro-batch
    of an accumulation step). FSDP2: set_requires_gradient_sync (it then keeps unsharded gradients meanwhile);
    DDP: no_sync(); one process: nothing to reduce."""
    if hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(enabled)
    elif not enabled and hasattr(net, "no_sync"):
        return net.no_sync()
    return contextlib.nullcontext()


def decay_groups(model, weight_decay, skip=()) -> list[dict]:
    """Two parameter groups: the model's weight matrices (2-D: projections, embeddings, LM head) with
    `weight_decay`, and the rest (norm gains, and parameters whose name contains a word of `skip`) without."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim == 2 and not any(w in name for w in skip) else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) parameter, gradient or optimizer state, else t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_rows(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The rows of a full-shape tensor (a mask) that this rank holds of a dim-0-sharded FSDP parameter."""
    if not hasattr(param, "to_local"):
        return full
    mesh = param.device_mesh
    return torch.chunk(full, mesh.size(), dim=0)[mesh.get_local_rank()]  # FSDP2 shards dim 0 as torch.chunk


def gather_rows(rows: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The inverse of local_rows, a collective (every rank calls it): each rank's rows, computed from its shard of
    `param`, joined into the full tensor (uneven shards included). Without FSDP, rows is the full tensor already."""
    if not hasattr(param, "to_local"):
        return rows
    from torch.distributed.tensor import DTensor
    shape = (param.shape[0], *rows.shape[1:])
    return DTensor.from_local(rows, param.device_mesh, param.placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride()).full_tensor()


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool (rows, n) tensor as uint8 (rows, ceil(n / 8)), eight entries per byte, on its device."""
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, -mask.shape[-1] % 8)).unflatten(-1, (-1, 8))
    return (bits << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_bits: the bool (rows, n) tensor."""
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.flatten(-2)[..., :n].bool()


def model_state(model, fsdp=False) -> dict:
    """The whole model's state dict on CPU (FSDP: gathered from all ranks; every rank must call this)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(model, optimizer, fsdp=False) -> dict:
    """The optimizer's state dict (FSDP: gathered in full, keyed by parameter name; every rank must call this)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict, fsdp=False):
    """The inverse of optimizer_state (FSDP: every rank reads the full state and keeps its own shard of it)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


# ----------------------------------------------------------------------------- resumable state


def save_state(path, state: dict):
    """torch.save atomically: a temp file in the same directory, then os.replace (never a torn file). A full disk is
    one line saying that the previous checkpoint, if any, is intact."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except DiskFull as e:
        raise DiskFull(f"{e.failed}: the checkpoint of step {state.get('step')} was not saved",
                       resume_hint(path)) from None


def resume_hint(state_path: Path) -> str:
    """What a full disk leaves the user, by whether a checkpoint exists to resume from."""
    return (f"{state_path} still holds the last good checkpoint: free some space, then continue with --resume"
            if state_path.exists() else "no checkpoint was written yet: free some space and start again")


def load_state(path) -> dict:
    """A state.pt written by save_state; one clear line when it is missing or damaged. Never executes code."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--resume: no {path}; start without --resume or point --out at the run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, a global that weights_only refuses
        raise UserError(f"--resume: cannot read {path} ({type(e).__name__}); it is truncated or not ours: start the "
                        f"run again with --overwrite instead of --resume (it replaces {path.parent})") from None


class StopRequest:
    """`with StopRequest() as stop:` around the training loop. SIGINT / SIGTERM (what a scheduler sends before
    preemption) only set a flag: the trainer checkpoints at the next step boundary and stops. `requested()`
    agrees across ranks, so every rank stops at the same step. A second signal interrupts at once."""

    def __enter__(self):
        self.name = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        self.restore()

    def _handle(self, signum, frame):
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def requested(self, device) -> bool:
        if not dist.is_initialized():
            return self.name is not None
        flag = torch.tensor(float(self.name is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def stop(self, step, args):
        """Every rank: end the run with one line naming the checkpoint and the command that continues it."""
        self.restore()
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        launcher = f"torchrun --nproc_per_node {world_size}" if world_size > 1 else "python"
        command = " ".join(shlex.quote(a) for a in sys.argv if a not in ("--resume", "--overwrite"))  # never both
        teardown()
        raise UserError(f"stopped by {self.name or 'a signal on another rank'} after step {step}; "
                        f"{Path(args.out) / 'state.pt'} holds it; continue with: {launcher} {command} --resume")


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as plain tensors/tuples that weights_only can load."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- log


class JsonlLog:
    """One JSON object per line, appended and flushed per record (a resumed run appends to the same file)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict):
        line = (json.dumps(record) + "\n").encode()
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "ab", buffering=0) as f:
                while line:
                    line = line[f.write(line):]
        except OSError as e:
            if not disk_full(e):
                raise
            os.truncate(self.path, size)  # no half record
            raise DiskFull(f"the disk is full: could not append to {self.path} (it keeps every earlier record)",
                           resume_hint(self.path.parent / "state.pt")) from None

    def keep_until(self, step, drop=None):
        """Drop the records after `step` (written after the checkpoint a resumed run starts from), and those that
        drop(record) names."""
        if not self.path.exists():
            return
        lines, kept = self.path.read_text().splitlines(keepends=True), []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a torn last record (a crash mid-write) was never a whole step's
                    break
                raise UserError(f"{self.path}:{number} is not a JSON record; delete that line and --resume again")
            if record["step"] <= step and not (drop and drop(record)):
                kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(kept)))


def plot_log(jsonl_path, png_path, keys, log_keys=("ppl",), refs=None, marks=None):
    """One panel per key against step, each value only where it was logged (a flip rate at mask updates, not
    carried between them). log_keys: panels on a log axis; refs: {key: {label: value}} dashed reference lines
    (dense, one-shot); marks: {label: step} vertical lines on every panel (PAT's milestone)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"skipping the plot {png_path}: pip install matplotlib")
        return
    records = {}
    for line in open(jsonl_path):
        r = json.loads(line)
        records.setdefault(r["step"], {}).update(r)
    steps = sorted(records)

    def plotted(key, s):  # a value that can be drawn: finite, and positive on a log axis
        v = records[s].get(key)
        return isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or key not in log_keys)
    keys = [k for k in keys if any(plotted(k, s) for s in steps)]  # an empty series gets no panel
    if not keys:
        print(f"no plot {png_path}: nothing was logged to draw")
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        xs = [s for s in steps if plotted(key, s)]
        ax.plot(xs, [records[s][key] for s in xs], marker="o" if len(xs) < 30 else None, markersize=3)
        for (label, value), color in zip(((refs or {}).get(key) or {}).items(), ("tab:green", "tab:red")):
            if value is not None and math.isfinite(value) and (value > 0 or key not in log_keys):
                ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{label} {value:.4g}")
        for label, step in (marks or {}).items():
            ax.axvline(step, color="gray", linestyle=":", linewidth=1, label=label if key == keys[0] else None)
        if key in log_keys:
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def plot_curves(curves, png_path, xlabel, ylabel, hlines=None, vlines=None):
    """One panel, one line per run: curves {label: [(x, y), ...]} on a log y axis; hlines {label: y} dashed
    (dense), vlines {label: x} dotted (a milestone). The studies' perplexity-over-training figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"skipping the plot {png_path}: pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in curves.items():
        ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, color="black", linestyle="--", linewidth=1, label=label)
    for label, x in (vlines or {}).items():
        ax.axvline(x, color="gray", linestyle=":", linewidth=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def check_finite(loss, step, last_ckpt):
    """Stop on NaN/inf loss with one line that names the last good checkpoint (or says there is none)."""
    value = float(loss)
    if not math.isfinite(value):
        if last_ckpt:
            raise UserError(f"loss is {value} at step {step}; last good checkpoint: {last_ckpt} (lower --lr or raise "
                            f"--warmup-steps, then --resume)")
        raise UserError(f"loss is {value} at step {step}, before any checkpoint, so there is nothing to resume: lower "
                        f"--lr or raise --warmup-steps and start again with --overwrite")


def teardown():
    """End a run cleanly on every rank: the process group, then the lock on --out."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    release_locks()
