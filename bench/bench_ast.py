"""Step time and peak memory of AST against plain dense fine-tuning, measured in one run.

    python bench/bench_ast.py                                  # SmolLM2-135M, CPU or GPU
    python bench/bench_ast.py --ckpt llama2-7b --batch-size 1 --seq-len 4096   # one big GPU

Each mode runs in its own subprocess (so peak memory is that mode's alone) on the same random token
batches: `dense` = the student unpruned, torch.optim.AdamW (foreach), CE only; `ast` = 2:4 STE student +
mask update every --mask-interval steps + decay (ARSAdamW) + the frozen teacher (bf16 on GPU) with
KL·T². Memory: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS minus its RSS
before the model was loaded. Targets (issue 5): AST ≤ 1.4× time, ≤ 1.3× memory.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import load  # noqa: E402
from cli import peak_memory_gb  # noqa: E402
from data import TokenBatches  # noqa: E402
from sparsity import nm_mask, prunable_linears  # noqa: E402
from train_ast import ASTArgs, make_optimizer, sparsify, train_step, update_masks  # noqa: E402
from training import autocast_dtype, pack_bits, setup_distributed  # noqa: E402


def rss_gb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 2 ** 20
    return 0.0


def run_mode(a):
    _, _, _, device = setup_distributed(a.device)
    dtype = autocast_dtype(a.autocast, device)
    base = rss_gb()
    student, _ = load(a.ckpt, device=device, tokenizer=False)
    args = ASTArgs(max_steps=a.warmup + a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=1e-5,
                   warmup_steps=1, alpha=0.67 if a.mode == "ast" else 0.0, mask_interval=a.mask_interval,
                   activation_checkpointing=False)
    teacher = None
    if a.mode == "ast":
        teacher = load(a.ckpt, device=device, dtype=torch.bfloat16 if device.type == "cuda" else dtype,
                       tokenizer=False)[0].requires_grad_(False)
        masks = {n: nm_mask(l.weight.detach().abs().float(), 2, 4) for n, l in prunable_linears(student).items()}
        layers = sparsify(student, masks)
        init = {n: pack_bits(m) for n, m in masks.items()}  # as the trainer keeps them: packed, on the device
        opt = make_optimizer(student, layers, args)
    else:
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    student.train()
    ids = np.random.default_rng(0).integers(0, student.args.vocab_size, 1_000_000).astype(np.uint32)
    batches = TokenBatches(ids, args.seq_len, args.batch_size, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.max_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(student, teacher, opt, batches, step, args, device, dtype)
        if a.mode == "ast" and (step + 1) % args.mask_interval == 0:
            update_masks(layers, init)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_memory_gb(device) - (0.0 if device.type == "cuda" else base)
    print(json.dumps({"mode": a.mode, "step_s": sum(times) / len(times), "peak_gb": peak, "device": str(device)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps (include one mask update at 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mask-interval", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--autocast", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--mode", choices=["dense", "ast"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        return run_mode(a)
    results = {}
    for mode in ("dense", "ast"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"error: {mode} run failed:\n{proc.stderr[-2000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    d, s = results["dense"], results["ast"]
    print(f"{a.ckpt} on {d['device']}, batch {a.batch_size} x {a.seq_len} tokens, {a.steps} timed steps")
    print(f"{'':8}{'step (s)':>10}{'peak mem (GB)':>15}")
    for name, r in (("dense", d), ("AST", s)):
        print(f"{name:8}{r['step_s']:>10.3f}{r['peak_gb']:>15.2f}")
    print(f"AST / dense: time {s['step_s'] / d['step_s']:.2f}x (target <= 1.4x), "
          f"memory {s['peak_gb'] / d['peak_gb']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
