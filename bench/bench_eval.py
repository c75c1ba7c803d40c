"""Zero-shot evaluation speed: items/s of our eval.py vs lm-evaluation-harness (HF backend) on the same model
(our Hugging Face export of the same weights), the same machine, threads and batch size, and the ratio.

    pip install lm-eval   # a reference for this script only
    python bench/bench_eval.py --ckpt smollm2-135m --limit 50 --batch-size 16 --threads 1

Both sides score the same task files with the same BOS setting (no BOS); each is warmed up on 2 items
first, then timed per task (ours first, then the harness), excluding model loading and dataset building.
Why we are faster: one packed row per item (shared context computed once, choices as segments), the LM
head only at continuation positions, and batch boundaries chosen to minimise padding (eval.length_batches);
the harness runs one row per (context, choice), a full-vocab log_softmax at every position, and fixed
chunks of its length-sorted requests.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import compare_lm_eval as cmp  # noqa: E402  (also puts the project root on sys.path)
import eval as ev  # noqa: E402
from model import cli_main  # noqa: E402


@dataclass
class BenchArgs:
    """items/s of eval.py vs lm-evaluation-harness on the same model, machine and batch size."""
    ckpt: str = "smollm2-135m"
    tasks: str = "all"  # comma list of the eight zero-shot tasks, or all
    limit: int = 50  # items per task
    batch_size: int = 16
    data_dir: str | None = None
    out: str = "out/bench_eval"  # the HF export lives here
    threads: int = 1  # torch threads for both sides (0: torch's default)


def main(argv=None):
    from data import resolve_data_dir
    from lm_eval.tasks import TaskManager
    from training import parse_config
    import model as model_lib
    args = parse_config(BenchArgs, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = list(ev.TASKS) if args.tasks == "all" else ev.parse_tasks(args.tasks)
    data_dir = resolve_data_dir(args.data_dir)
    model, tokenizer = model_lib.load(args.ckpt)
    model_dir, tok_dir = cmp.export_for_harness(model, tokenizer, args.ckpt, args.out)
    lm = cmp.harness_lm(model_dir, tok_dir, args.batch_size, bos=False)
    rows = []
    with tempfile.TemporaryDirectory() as yaml_dir:
        names = cmp.write_task_yamls(yaml_dir, data_dir, tasks)
        tm = TaskManager(include_path=yaml_dir)
        ev.evaluate_task(model, tokenizer, tasks[0], data_dir, 2, args.batch_size, bos=False)  # warm-up
        cmp.run_harness_task(lm, tm, names[tasks[0]], 2)
        for task in tasks:
            t0 = time.perf_counter()
            n = ev.evaluate_task(model, tokenizer, task, data_dir, args.limit, args.batch_size, bos=False)["n"]
            ours = time.perf_counter() - t0
            theirs = cmp.run_harness_task(lm, tm, names[task], args.limit)[1]
            rows.append((task, n, ours, theirs))
    print(f"\n{args.ckpt} fp32 CPU, {torch.get_num_threads()} thread(s), batch size {args.batch_size}, BOS=no, "
          f"--limit {args.limit}")
    print("| task | n | ours items/s | lm-eval items/s | ratio |")
    print("|---|---|---|---|---|")
    for task, n, ours, theirs in rows:
        print(f"| {task} | {n} | {n / ours:.2f} | {n / theirs:.2f} | {theirs / ours:.2f}x |")
    n = sum(r[1] for r in rows)
    ours, theirs = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"| all | {n} | {n / ours:.2f} | {n / theirs:.2f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    cli_main(main)
