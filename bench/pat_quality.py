"""PAT against its baselines on SmolLM2-135M at one pruning ratio and equal training tokens. Resumable.

    python bench/pat_quality.py                                          # the CPU study (about 2 h on 2 free cores)
    python bench/pat_quality.py --max-steps 4 --limit 10 --eval-interval 2 --out /tmp/pq   # smoke run
    python bench/pat_quality.py --max-steps 3000 --batch-size 16 --seq-len 256 --ppl-windows 0   # a GPU study

Arms (LoRA on the seven projections in every arm: same flags, data order, steps, batch and seq_len):
- lora:       dense LoRA fine-tuning (train_pat --ratio 0), the unpruned reference;
- prune_lora: one-shot prune of the channels of lowest residual-stream norm (pat.residual_channel_norms over the
              --calib-batches first training batches, the ones train_pat's own baseline uses; pat.prune_channels),
              then LoRA (train_pat --ratio 0 on the narrower checkpoint), as train_pat --baseline lora does;
- pat:        PAT as in the paper (mask logits start at 0), with the official freeze at 0.8 s0;
- pat_rms:    PAT with our data start of the mask logits (--mask-init rms), everything else as `pat`.
Each arm is a train_pat run in <out>/<arm>/ (a stopped one continues with train_pat's --resume; the study saves
state every --ckpt-interval steps). A finished arm writes <out>/<arm>.json (WikiText-2 perplexity of the merged
model, zero-shot accuracy with eval.evaluate) and is skipped when the study runs again. At the end:
<out>/results.md (the table) and <out>/ppl.png (perplexity over steps per arm; PAT's soft-mask model before s0).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import data  # noqa: E402
import pat  # noqa: E402
import train_pat  # noqa: E402
import training  # noqa: E402
from cli import atomic_write, cli_main  # noqa: E402
from eval import WikiText2, evaluate  # noqa: E402

ARMS = {"lora": "LoRA only, dense (0%)", "prune_lora": "prune lowest-norm channels, then LoRA",
        "pat": "PAT, paper (mask logits start at 0)", "pat_rms": "PAT, ours (--mask-init rms)"}
TASKS = ["arc_easy", "piqa", "winogrande", "hellaswag"]


def prune_lowest_norm(a, out_dir):
    """The one-shot prune: keep the N channels of largest residual norm, merged into a narrower checkpoint."""
    model, tokenizer = checkpoint.load(a.ckpt)
    batches = data.training_batches(a.data, data.resolve_data_dir(a.data_dir), tokenizer, a.seq_len, a.batch_size,
                                    seed=0)  # train_pat's default --seed: the same batches as its baseline
    norms = pat.residual_channel_norms(model, [batches.next()[0] for _ in range(a.calib_batches)])
    keep = pat.top_n(norms, pat.target_width(model.args.dim, a.ratio, train_pat.PATArgs.width_multiple))
    checkpoint.save(pat.prune_channels(model, keep), tokenizer, out_dir,
                    meta={"method": "one-shot prune of the lowest residual-norm channels", "ratio": a.ratio})


def run_arm(arm, a, out, common):
    """Train (or resume) one arm, evaluate its merged model, write <out>/<arm>.json; return that record."""
    run = out / arm
    ckpt = a.ckpt
    if arm == "prune_lora":
        ckpt = str(out / "pruned")
        if not (out / "pruned" / "params.json").exists():
            prune_lowest_norm(a, out / "pruned")
    flags = {"lora": ["--ratio", "0"], "prune_lora": ["--ratio", "0"],
             "pat": ["--ratio", str(a.ratio), "--mask-init", "zeros"],
             "pat_rms": ["--ratio", str(a.ratio), "--mask-init", "rms"]}[arm]
    resume = ["--resume"] if (run / "state.pt").exists() else ["--overwrite"]  # --overwrite: died before a checkpoint
    train_pat.main(common + flags + ["--ckpt", ckpt, "--out", str(run)] + resume)
    model, tokenizer = checkpoint.load(run / "final")
    data_dir = data.resolve_data_dir(a.data_dir)
    ppl = WikiText2(tokenizer, data_dir, a.ppl_seq_len, a.ppl_windows)
    results = evaluate(model, tokenizer, TASKS, data_dir, limit=a.limit)["results"]
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    record = {"arm": arm, "dim": model.args.dim, "params": pat.count_params(model), "ppl": ppl(model),
              "ppl_protocol": ppl.describe(), "acc": {t: results[t]["acc"] for t in TASKS},
              "acc_norm": {t: results[t]["acc_norm"] for t in TASKS},
              "curve": [(r["step"], r["ppl"]) for r in log if r.get("ppl") is not None],
              "before": next(r["ppl"] for r in log if "ppl" in r)}
    atomic_write(out / f"{arm}.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def table(records, a) -> str:
    tokens = a.max_steps * a.batch_size * a.seq_len
    head = (f"SmolLM2-135M, ratio {a.ratio}, {a.max_steps} steps x {a.batch_size} x {a.seq_len} = {tokens:,} training "
            f"tokens per arm (--data {a.data}); {records[0]['ppl_protocol']}; zero-shot acc, first {a.limit} items\n\n")
    rows = ["| arm | dim | params | ppl before | ppl merged | " + " | ".join(TASKS) + " | mean |",
            "|---|---|---|---|---|" + "---|" * (len(TASKS) + 1)]
    for r in records:
        accs = [r["acc"][t] for t in TASKS]
        rows.append(f"| {ARMS[r['arm']]} | {r['dim']} | {r['params'] / 1e6:.1f}M | {r['before']:.2f} | {r['ppl']:.2f} | "
                    + " | ".join(f"{100 * x:.1f}" for x in accs) + f" | {100 * sum(accs) / len(accs):.1f} |")
    return head + "\n".join(rows) + "\n"


def plot(records, path, milestone):
    training.plot_curves({ARMS[r["arm"]]: r["curve"] for r in records}, path, "step", "WikiText-2 perplexity",
                         vlines={f"PAT milestone s0 = {milestone}": milestone})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m")
    p.add_argument("--out", default="out/pat_quality")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--data", default="text", help="train_pat --data")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calib-batches", type=int, default=4, help="train_pat --calib-batches (and the prune arm's)")
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--eval-interval", type=int, default=50, help="steps between perplexity points of the curve")
    p.add_argument("--ckpt-interval", type=int, default=50, help="steps between resumable checkpoints of an arm")
    p.add_argument("--limit", type=int, default=500, help="first N items of each zero-shot task")
    p.add_argument("--resume", action="store_true", help="accepted, not needed: a rerun always continues")
    a = p.parse_args()
    arms = [arm.strip() for arm in a.arms.split(",") if arm.strip()]
    if unknown := [arm for arm in arms if arm not in ARMS]:
        raise SystemExit(f"error: unknown arm {unknown[0]}; choose from {', '.join(ARMS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data", a.data, "--max-steps", str(a.max_steps), "--batch-size", str(a.batch_size),
              "--seq-len", str(a.seq_len), "--lr", str(a.lr), "--warmup-steps", str(max(1, a.max_steps // 20)),
              "--ppl-windows", str(a.ppl_windows), "--ppl-seq-len", str(a.ppl_seq_len),
              "--eval-interval", str(a.eval_interval), "--ckpt-interval", str(a.ckpt_interval),
              "--calib-batches", str(a.calib_batches), "--log-interval", "10", "--baseline", "prune"]
    common += ["--data-dir", a.data_dir] if a.data_dir else []
    records = []
    for arm in arms:
        done = out / f"{arm}.json"
        if done.exists():
            print(f"=== {arm}: done ({done})", flush=True)
            records.append(json.loads(done.read_text()))
            continue
        print(f"\n=== {arm} ===", flush=True)
        torch.manual_seed(0)
        records.append(run_arm(arm, a, out, common))
    text = table(records, a)
    (out / "results.md").write_text(text)
    plot(records, out / "ppl.png", max(1, a.max_steps // 3))
    print("\n" + text + f"\nresults: {out / 'results.md'}, curves: {out / 'ppl.png'}")


if __name__ == "__main__":
    cli_main(main)  # a stopped arm (Ctrl-C, SIGTERM) ends with one line; rerunning the command continues it
