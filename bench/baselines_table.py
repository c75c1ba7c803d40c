"""
The README's one-shot baselines table: WikiText-2 perplexity of dense / magnitude / Wanda / SparseGPT at
50%, 2:4 and 4:8, with the time and peak memory of each run, from one process (the model is loaded once,
the dense weights are restored before every run, every run calibrates on the same windows).

    python bench/baselines_table.py --ckpt smollm2-135m --nsamples 16 --calib-len 256 --ppl-seq-len 2048 --ppl-windows 2

Writes the markdown table to stdout and every number to <--out>/baselines_table.json (rewritten after each run);
an existing table is continued with --resume or replaced with --overwrite, never silently.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sparsity as sp  # noqa: E402
from checkpoint import load  # noqa: E402
from cli import (Device, UserError, atomic_write, check_output_dir, cli_main, parse_config, peak_memory_gb,  # noqa: E402
                 reset_peak_memory, resolve_device)
from data import c4_paths, calibration_windows, resolve_data_dir  # noqa: E402
from eval import WikiText2, check_ppl_seq_len  # noqa: E402

PROTOCOL_KEYS = ("ckpt", "protocol", "calibration")  # a table resumes only under the same ones


@dataclass
class TableArgs:
    """Dense, magnitude, Wanda and SparseGPT perplexity at several patterns, from one process."""
    ckpt: str = "smollm2-135m"  # model name or checkpoint path (checkpoint.load)
    methods: str = "wanda,sparsegpt,magnitude"  # comma list of magnitude, wanda, sparsegpt
    patterns: str = "2:4,0.5,4:8"  # comma list of N:M patterns and pruned fractions
    nsamples: int = 128  # calibration windows
    calib_len: int = 2048  # tokens per calibration window
    ppl_seq_len: int = 2048  # WikiText-2 perplexity window length
    ppl_windows: int = 0  # evaluate only the first N perplexity windows (0: all)
    data_dir: str | None = None  # default ./data, then ../shared/data
    device: Device = "auto"  # auto: cuda when torch sees a GPU, else cpu
    out: str = "out"  # directory for baselines_table.json
    resume: bool = False  # keep the runs already in <out>/baselines_table.json (same protocol)
    overwrite: bool = False  # replace an existing <out>/baselines_table.json


def check_args(args):
    """(methods, patterns, table path, the table to resume or {}): every name and the output checked before the
    model loads, so a typo never costs the dense evaluation or an earlier table."""
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",")))
    for method in methods:
        if method not in sp.METHODS:
            raise UserError(f"--methods: unknown method {method!r}; choose from {', '.join(sp.METHODS)}")
    patterns = list(dict.fromkeys(p.strip() for p in args.patterns.split(",")))
    for pattern in patterns:
        try:
            sp.parse_sparsity(pattern)
        except UserError as e:
            raise UserError(f"--patterns: {e}") from None
    check_ppl_seq_len(args.ppl_seq_len)
    if args.resume and args.overwrite:
        raise UserError("--resume keeps the table in --out, --overwrite replaces it: choose one")
    table = check_output_dir(args.out, overwrite=True) / "baselines_table.json"  # --out may hold other results
    if table.exists() and not (args.resume or args.overwrite):
        raise UserError(f"{table} already holds a table: continue it with --resume, replace it with --overwrite, "
                        f"or choose another --out")
    old = {}
    if args.resume and table.exists():
        try:
            old = json.loads(table.read_text())
            assert all(k in old for k in (*PROTOCOL_KEYS, "dense_ppl", "eval_s", "runs"))
        except (ValueError, AssertionError):
            raise UserError(f"cannot resume {table}: it is not a table this script wrote; --overwrite replaces it")
    return methods, patterns, table, old


def main(argv=None):
    args = parse_config(TableArgs, argv)
    methods, patterns, out, old = check_args(args)
    device, data_dir = resolve_device(args.device), resolve_data_dir(args.data_dir)
    model, tokenizer = load(args.ckpt, device=device)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ppl = WikiText2(tokenizer, data_dir, args.ppl_seq_len, args.ppl_windows)
    protocol = ppl.describe()
    print(protocol, flush=True)
    calib = calibration_windows(tokenizer, c4_paths(data_dir), args.nsamples, args.calib_len, seed=0)
    results = {"ckpt": args.ckpt, "protocol": protocol, "calibration": f"{args.nsamples} x {args.calib_len} C4 tokens, seed 0",
               "torch_threads": torch.get_num_threads(), "runs": []}
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))

    if old:
        differ = [k for k in PROTOCOL_KEYS if old[k] != results[k]]
        if differ:
            raise UserError(f"cannot resume {out}: its {differ[0]} was {old[differ[0]]!r}, this run's is "
                            f"{results[differ[0]]!r}; --overwrite replaces the table, or choose another --out")
        results.update(dense_ppl=old["dense_ppl"], eval_s=old["eval_s"], runs=old["runs"])  # continue a cut run
        print(f"resuming {out}: dense ppl {results['dense_ppl']:.3f}, {len(old['runs'])} runs done", flush=True)
    else:
        t = time.perf_counter()
        results["dense_ppl"] = ppl(model)
        results["eval_s"] = time.perf_counter() - t
        print(f"dense ppl {results['dense_ppl']:.3f} ({results['eval_s']:.0f}s)", flush=True)
        write()

    done = {(r["method"], r["sparsity"]) for r in results["runs"]}
    for pattern in patterns:
        for method in methods:
            if (method, pattern) in done:
                continue
            model.load_state_dict(dense)
            reset_peak_memory(device)
            report = {}
            masks = sp.prune(model, method, pattern, calib if method != "magnitude" else None, report=report)
            peak = peak_memory_gb(device)
            sp.verify(model, masks, sp.parse_sparsity(pattern))
            run = dict(method=method, sparsity=pattern, ppl=ppl(model), peak_memory_gb=peak, layers=len(masks), **report)
            results["runs"].append(run)
            write()
            print(f"{method} {pattern}: ppl {run['ppl']:.3f} | {report['total_s']:.1f}s (forward {report['forward_s']:.1f}s, "
                  f"{method} {report['method_s']:.1f}s) | peak {peak:.2f} GB | {len(masks)} layers verified", flush=True)

    cols = sorted(patterns, key=lambda s: (":" in s, s))
    runs = {(r["method"], r["sparsity"]): r for r in results["runs"]}
    print(f"\n{protocol}; calibration {results['calibration']}\n")
    print("| method | " + " | ".join("50%" if c == "0.5" else c for c in cols) + " | seconds per run (" + "/".join("50%" if c == "0.5" else c for c in cols) + ") |")
    print("|---|" + "---|" * (len(cols) + 1))
    print("| dense | " + " | ".join(f"{results['dense_ppl']:.2f}" for _ in cols) + " | |")
    for method in ["magnitude", "wanda", "sparsegpt"]:
        if any((method, c) in runs for c in cols):
            cells = [f"{runs[(method, c)]['ppl']:.2f}" if (method, c) in runs else "" for c in cols]
            times = "/".join(f"{runs[(method, c)]['total_s']:.0f}" for c in cols if (method, c) in runs)
            print(f"| {method} | " + " | ".join(cells) + f" | {times} |")


if __name__ == "__main__":
    cli_main(main)
