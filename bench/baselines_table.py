"""
The README's one-shot baselines table: WikiText-2 perplexity of dense / magnitude / Wanda / SparseGPT at
50%, 2:4 and 4:8, with the time and peak memory of each run, from one process (the model is loaded once,
the dense weights are restored before every run, every run calibrates on the same windows).

    python bench/baselines_table.py --ckpt smollm2-135m --nsamples 16 --calib-len 256 --seq-len 2048 --limit 2

Writes the markdown table to stdout and every number to --out (JSON, rewritten after each run).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import sparsity as sp  # noqa: E402
from eval import perplexity, perplexity_protocol  # noqa: E402
from model import cli_main, load  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--ckpt", default="smollm2-135m")
    p.add_argument("--methods", default="wanda,sparsegpt,magnitude")
    p.add_argument("--patterns", default="2:4,0.5,4:8")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="out/baselines_table.json")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out (same protocol)")
    args = p.parse_args()
    device = torch.device(args.device)
    data_dir = data.resolve_data_dir(args.data_dir)
    model, tokenizer = load(args.ckpt, device=args.device)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    text = data.wikitext2_text(data_dir)
    proto = perplexity_protocol(tokenizer, text, args.seq_len, limit=args.limit)
    protocol = (f"WikiText-2 test, seq-len {proto['seq_len']}, first {proto['windows']} of "
                f"{proto['tokens'] // proto['seq_len']} windows, BOS {'yes' if proto['bos'] else 'no'}")
    print(protocol, flush=True)
    calib = sp.calibration_windows(tokenizer, sp.c4_paths(data_dir), args.nsamples, args.calib_len, seed=0)
    results = {"ckpt": args.ckpt, "protocol": protocol, "calibration": f"{args.nsamples} x {args.calib_len} C4 tokens, seed 0",
               "torch_threads": torch.get_num_threads(), "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    old = json.loads(out.read_text()) if args.resume and out.exists() else {}
    if old and all(old.get(k) == results[k] for k in ("ckpt", "protocol", "calibration")):
        results.update(dense_ppl=old["dense_ppl"], eval_s=old["eval_s"], runs=old["runs"])  # continue a cut run
        print(f"resuming {out}: dense ppl {results['dense_ppl']:.3f}, {len(old['runs'])} runs done", flush=True)
    else:
        t = time.perf_counter()
        results["dense_ppl"] = perplexity(model, tokenizer, text, args.seq_len, limit=args.limit)
        results["eval_s"] = time.perf_counter() - t
        print(f"dense ppl {results['dense_ppl']:.3f} ({results['eval_s']:.0f}s)", flush=True)
        out.write_text(json.dumps(results, indent=1))

    done = {(r["method"], r["sparsity"]) for r in results["runs"]}
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            if (method, pattern) in done:
                continue
            model.load_state_dict(dense)
            sp.reset_peak_memory(device)
            report = {}
            masks = sp.prune(model, method, pattern, calib if method != "magnitude" else None, report=report)
            peak = sp.peak_memory_gb(device)
            sp.verify(model, masks, sp.parse_sparsity(pattern))
            ppl = perplexity(model, tokenizer, text, args.seq_len, limit=args.limit)
            run = dict(method=method, sparsity=pattern, ppl=ppl, peak_memory_gb=peak, layers=len(masks), **report)
            results["runs"].append(run)
            out.write_text(json.dumps(results, indent=1))
            print(f"{method} {pattern}: ppl {ppl:.3f} | {report['total_s']:.1f}s (forward {report['forward_s']:.1f}s, "
                  f"{method} {report['method_s']:.1f}s) | peak {peak:.2f} GB | {len(masks)} layers verified", flush=True)

    patterns = args.patterns.split(",")
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
