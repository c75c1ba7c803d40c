"""Training machinery shared by train_ast.py and train_pat.py.

Config dataclass -> CLI flags, distributed setup, LR schedule, seeded random token windows that resume
exactly, atomic checkpoints with RNG states, a JSONL log with a PNG plot, a progress line, a NaN stop.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model import UserError


@dataclass
class TrainArgs:
    ckpt: str = "smollm2-135m"  # model name or checkpoint path (model.load)
    data_dir: str | None = None  # default: ./data, else ../shared/data
    out: str = "out/train"  # each trainer sets out/<script>
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 512
    lr: float = 2e-5  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine ends at min_lr_ratio * lr
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    device: str = "auto"  # cuda if available else cpu
    dtype: str = "auto"  # autocast dtype: bfloat16 on GPU, float32 on CPU
    seed: int = 0
    ckpt_interval: int = 500  # steps between resumable checkpoints; 0: only at the end
    eval_interval: int = 500  # steps between WikiText-2 perplexity evals; 0: only at the end; -1: never
    eval_windows: int = 16  # WikiText-2 windows per eval; 0: the whole test set
    log_interval: int = 10
    compile: bool = False  # torch.compile the student
    resume: bool = False  # continue from <out>/state.pt


def _flag_type(hint):
    """The argparse type of a field annotation: `int`, `float`, `str`, or `X | None` -> X."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def parse_config(cls, argv=None):
    """One CLI flag per dataclass field (max_steps -> --max-steps; bools as --flag/--no-flag)."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip() or None,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _flag_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=" ")
        else:
            parser.add_argument(flag, type=kind, default=default, help=" ")
    return cls(**vars(parser.parse_args(argv)))


def setup_distributed(device="auto"):
    """(rank, world_size, local_rank, device): torchrun's env (nccl on CUDA, gloo on CPU) or one process."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device(device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world_size, local_rank, torch.device(device)


def autocast_dtype(dtype: str, device) -> torch.dtype:
    """The compute dtype: `auto` is bfloat16 on GPU and float32 on CPU."""
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def autocast(dtype: torch.dtype, device):
    """Mixed precision context (weights stay fp32); a no-op for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def lr_at(step: int, args) -> float:
    """Linear warmup to args.lr over warmup_steps, then cosine down to min_lr_ratio * lr at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    min_lr = args.min_lr_ratio * args.lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - min_lr)


class TokenBatches:
    """Random (x, y) windows of seq_len + 1 tokens from one token array, drawn by a seeded generator.

    Every rank draws the same world_size * batch_size offsets and keeps its own slice, so the ranks see
    disjoint windows and N processes see exactly the batch one process with N x batch_size would see."""

    def __init__(self, ids, seq_len, batch_size, seed, rank=0, world_size=1):
        if len(ids) < seq_len + 2:
            raise UserError(f"only {len(ids)} training tokens for --seq-len {seq_len}; add text or lower --seq-len")
        self.ids, self.seq_len, self.batch_size = ids, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next(self):
        n = self.world_size * self.batch_size
        starts = torch.randint(len(self.ids) - self.seq_len, (n,), generator=self.generator)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        rows = np.stack([np.asarray(self.ids[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        self.batches_drawn += 1
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.batches_drawn = state["batches_drawn"]


def save_state(path, state: dict):
    """torch.save atomically: a temp file in the same directory, then os.replace (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # never execute a checkpoint


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


class JsonlLog:
    """One JSON object per line, appended and flushed per record (a resumed run appends to the same file)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_log(jsonl_path, png_path, keys):
    """One panel per key against step; for a step logged twice (a resumed run) the last record wins."""
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
    keys = [k for k in keys if any(k in records[s] for s in steps)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        xs = [s for s in steps if records[s].get(key) is not None]
        ax.plot(xs, [records[s][key] for s in xs], marker="." if len(xs) < 30 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class Progress:
    """`step 120/1000 | loss 2.31 ce 2.9 | lr 1.8e-05 | 5,400 tok/s | ETA 12m03s`."""

    def __init__(self, total_steps, start_step=0):
        self.total, self.start_step = total_steps, start_step
        self.t0 = self.t_last = time.perf_counter()

    def line(self, step, tokens, lr, **parts):
        """step: steps done; tokens: tokens processed since the previous call (all ranks)."""
        now = time.perf_counter()
        tok_s = tokens / max(now - self.t_last, 1e-9)
        self.t_last = now
        done = step - self.start_step
        eta = (now - self.t0) / done * (self.total - step) if done > 0 else 0.0
        fields = " ".join(f"{k} {v:.4g}" for k, v in parts.items() if v is not None)
        return (f"step {step}/{self.total} | {fields} | lr {lr:.3g} | {tok_s:,.0f} tok/s"
                f" | ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def check_finite(loss, step, last_ckpt):
    """Stop on NaN/inf loss with one line that names the last good checkpoint."""
    value = float(loss)
    if not math.isfinite(value):
        raise UserError(f"loss is {value} at step {step}; last good checkpoint: {last_ckpt or 'none yet'}"
                        f" (lower --lr or raise --warmup-steps, then --resume)")
