"""PAT against its baselines on SmolLM2-135M at one pruning ratio and equal training tokens. Resumable.

    python bench/pat_quality.py                                          # the CPU study (about 2 h on 2 free cores)
    python bench/pat_quality.py --max-steps 4 --limit 10 --eval-interval 2 --out /tmp/pq   # smoke run
    python bench/pat_quality.py --max-steps 3000 --batch-size 16 --seq-len 256 --ppl-windows 0   # a GPU study
    python bench/pat_quality.py --budget 3 --arms pat_rms,prune_lora    # 3x the tokens: 1,800 steps, s0 = 600
    python bench/pat_quality.py --report                                 # the tables and plots so far, no work

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

--budget K multiplies the training tokens, with the schedule's shape kept: K x --max-steps steps, s0 at a third
of them, the mask frozen from 0.8 s0 (train_pat's --freeze-at), the warmup a twentieth; the arms of a budget
other than 1 live in <out>/budget<K>/. <out>/budget.png draws each arm's merged perplexity against training tokens
over the budgets found (for an arm run at two budgets or more).
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import data  # noqa: E402
import pat  # noqa: E402
import train_pat  # noqa: E402
import training  # noqa: E402
from cli import UserError, atomic_write, cli_main  # noqa: E402
from eval import WikiText2, evaluate  # noqa: E402

ARMS = {"lora": "LoRA only, dense (0%)", "prune_lora": "prune lowest-norm channels, then LoRA",
        "pat": "PAT, paper (mask logits start at 0)", "pat_rms": "PAT, ours (--mask-init rms)"}
TASKS = ["arc_easy", "piqa", "winogrande", "hellaswag"]


def schedule(a, budget) -> dict:
    """Steps, s0, the freeze step and the warmup at `budget` times the study's tokens: they scale together."""
    steps, s0 = budget * a.max_steps, budget * max(1, a.max_steps // 3)
    return {"steps": steps, "s0": s0, "freeze": int(train_pat.PATArgs.freeze_at * s0), "warmup": max(1, steps // 20)}


def budget_dir(out, budget) -> Path:
    """Where the arms of one budget live: <out> at the study's, <out>/budget<K> at K times its tokens."""
    return out if budget == 1 else out / f"budget{budget}"


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


def table(records, a, budget) -> str:
    plan = schedule(a, budget)
    tokens = plan["steps"] * a.batch_size * a.seq_len
    head = (f"SmolLM2-135M, ratio {a.ratio}, budget {budget}: {plan['steps']:,} steps x {a.batch_size} x "
            f"{a.seq_len} = {tokens:,} training tokens per arm (--data {a.data}), warmup {plan['warmup']}; PAT: "
            f"s0 {plan['s0']}, mask frozen from step {plan['freeze']}; {records[0]['ppl_protocol']}; zero-shot acc, "
            f"first {a.limit} items\n\n")
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


def finished(out) -> dict:
    """{budget: [records of its finished arms]} for every budget in --out that has one."""
    found = {}
    for folder in [out, *out.glob("budget*")]:
        match = re.fullmatch(r"budget(\d+)", folder.name) if folder != out else None
        budget = int(match[1]) if match else 1
        if folder == out or match:
            if records := [json.loads((folder / f"{arm}.json").read_text()) for arm in ARMS
                           if (folder / f"{arm}.json").exists()]:
                found[budget] = records
    return dict(sorted(found.items()))


def report(a, out):
    """Each budget's table (also <folder>/results.md) and curves, and the trend over budgets in <out>/budget.png."""
    found = finished(out)
    if not found:
        raise UserError(f"--out {out}: no finished arm in it or in its budget*/ folders; run the study into it first "
                        f"(python bench/pat_quality.py --out {out})")
    for budget, records in found.items():
        text = table(records, a, budget)
        (budget_dir(out, budget) / "results.md").write_text(text)
        plot(records, budget_dir(out, budget) / "ppl.png", schedule(a, budget)["s0"])
        print("\n" + text + f"\nresults: {budget_dir(out, budget) / 'results.md'}, curves: "
              f"{budget_dir(out, budget) / 'ppl.png'}")
    trends = {}
    for budget, records in found.items():
        for r in records:
            trends.setdefault(ARMS[r["arm"]], []).append((schedule(a, budget)["steps"] * a.batch_size * a.seq_len,
                                                          r["ppl"]))
    if trends := {label: points for label, points in trends.items() if len(points) > 1}:
        training.plot_curves(trends, out / "budget.png", "training tokens", "WikiText-2 ppl of the merged model")
        print(f"budget trend: {out / 'budget.png'}")
    else:
        print("no budget.png: no arm has finished at two budgets yet")


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
    p.add_argument("--budget", type=int, default=1,
                   help="K times the training tokens (steps, s0, the freeze, the warmup scale together); <out>/budgetK")
    p.add_argument("--report", action="store_true", help="only the tables and plots of the finished arms, no work")
    a = p.parse_args()
    arms = [arm.strip() for arm in a.arms.split(",") if arm.strip()]
    if unknown := [arm for arm in arms if arm not in ARMS]:
        raise UserError(f"unknown arm {unknown[0]}; choose from {', '.join(ARMS)}")
    if a.budget < 1:
        raise UserError(f"--budget {a.budget}: must be 1 or more (a multiple of the study's tokens)")
    out = Path(a.out)
    if a.report:
        return report(a, out)
    plan, folder = schedule(a, a.budget), budget_dir(out, a.budget)
    folder.mkdir(parents=True, exist_ok=True)
    common = ["--data", a.data, "--max-steps", str(plan["steps"]), "--milestone", str(plan["s0"]),
              "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--lr", str(a.lr),
              "--warmup-steps", str(plan["warmup"]), "--ppl-windows", str(a.ppl_windows),
              "--ppl-seq-len", str(a.ppl_seq_len),
              "--eval-interval", str(a.eval_interval), "--ckpt-interval", str(a.ckpt_interval),
              "--calib-batches", str(a.calib_batches), "--log-interval", "10", "--baseline", "prune"]
    common += ["--data-dir", a.data_dir] if a.data_dir else []
    for arm in arms:
        if (folder / f"{arm}.json").exists():
            print(f"=== {arm}: done ({folder / f'{arm}.json'})", flush=True)
            continue
        print(f"\n=== {arm}, budget {a.budget}: {plan} ===", flush=True)
        torch.manual_seed(0)
        run_arm(arm, a, folder, common)
    report(a, out)


if __name__ == "__main__":
    cli_main(main)  # a stopped arm (Ctrl-C, SIGTERM) ends with one line; rerunning the command continues it
