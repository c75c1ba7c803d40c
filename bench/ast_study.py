"""
AST's ablations at our scale: which of the paper's orderings hold on SmolLM2-135M (arXiv 2407.20584, §4 and
its ablation table). One seed, one data order, one token budget and the same hyper-parameters for every arm,
fixed before the runs (the StudyArgs defaults below); every final model scored on the same protocol.

    python bench/ast_study.py                          # every arm into out/ast_study/ (hours on a 2-core CPU)
    python bench/ast_study.py --arms dense,ast         # some arms
    python bench/ast_study.py --report                 # the table and the PNG from results.json, no work

Resumable: each finished arm is recorded in <out>/results.json and skipped on the next run; an arm stopped
mid-training continues from its state.pt (train_ast.py --resume); a SIGTERM stops the running arm at a step
boundary. Arms:
  dense                      the teacher, no pruning
  magnitude, wanda, sparsegpt  one-shot 2:4 (sparsity.py), no training
  sparse_ft        fixed magnitude mask, CE only           (--mask-interval 0 --decay-max 0 --alpha 0)
  fixed_kd         fixed magnitude mask, distillation      (--mask-interval 0 --decay-max 0)
  ast_no_kd        adaptive masks + annealed decay, CE     (--alpha 0)
  ast_no_decay     adaptive masks, distillation, no decay  (--decay-max 0)
  ast              adaptive masks + annealed decay + distillation
  ast_slorb        AST + SLoRB, k = 16                     (--slorb-k 16)
  ast_sparsegpt    AST started from the SparseGPT 2:4 checkpoint's weights and masks (--init-mask)
"""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from checkpoint import load  # noqa: E402
from cli import UserError, atomic_write, cli_main, parse_config  # noqa: E402
from data import resolve_data_dir  # noqa: E402
from eval import WikiText2, evaluate_task  # noqa: E402
import training  # noqa: E402

ONESHOT = ("magnitude", "wanda", "sparsegpt")
TRAINED = {  # arm: train_ast.py flags on top of the shared ones
    "ast": [],
    "fixed_kd": ["--mask-interval", "0", "--decay-max", "0"],
    "sparse_ft": ["--mask-interval", "0", "--decay-max", "0", "--alpha", "0"],
    "ast_no_kd": ["--alpha", "0"],
    "ast_no_decay": ["--decay-max", "0"],
    "ast_sparsegpt": ["--init-mask", "{out}/sparsegpt"],
    "ast_slorb": ["--slorb-k", "16"],
}
ARMS = ("dense", "magnitude", "ast", "fixed_kd", "sparse_ft", "ast_no_kd", "ast_no_decay", "wanda", "sparsegpt",
        "ast_sparsegpt", "ast_slorb")  # the order they run in: the comparisons that matter most first
TASKS = ("arc_easy", "piqa", "winogrande", "hellaswag")


@dataclass
class StudyArgs:
    """AST ablation study on one model: one-shot baselines and seven training arms, scored alike."""
    ckpt: str = "smollm2-135m"  # dense model (checkpoint.load)
    out: str = "out/ast_study"  # results.json, study.png, one folder per arm
    arms: str = ",".join(ARMS)  # comma list of arms to run (see the docstring)
    report: bool = False  # only print the table and draw the PNG from results.json
    data_dir: str | None = None  # default ./data, then ../shared/data
    # training, identical for every trained arm (the README demo's settings, 200 steps)
    max_steps: int = 200  # optimizer steps per trained arm
    batch_size: int = 4  # sequences per step
    seq_len: int = 128  # training window length
    lr: float = 2e-4  # peak learning rate (cosine to 0.1×, warmup below)
    warmup_steps: int = 10  # linear warmup steps
    curve_interval: int = 50  # steps between the 4-window perplexities of the curve
    # one-shot calibration (Wanda, SparseGPT): C4 windows, seed 0
    nsamples: int = 64  # calibration windows
    calib_len: int = 512  # tokens per calibration window
    # the final scoring of every model
    limit: int = 200  # records per zero-shot task
    threads: int = 0  # torch threads for every step (0: torch's default)


def run(cmd, threads):
    """A child script; its failure (or a SIGTERM it obeyed) stops the study with its last lines."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731  the child checkpoints, then exits 1
    old = signal.signal(signal.SIGTERM, forward), signal.signal(signal.SIGINT, forward)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, old[0]), signal.signal(signal.SIGINT, old[1])
    if code:
        raise UserError(f"{cmd[1]} stopped with status {code}; rerun the same command to continue the study")


def train_arm(arm, args, out):
    """train_ast.py for one arm (resuming its state.pt if one exists); returns its run directory."""
    run_dir = out / arm
    cmd = [sys.executable, "train_ast.py", "--ckpt", args.ckpt, "--out", str(run_dir),
           "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--eval-interval", str(args.curve_interval),
           "--ppl-windows", "4", "--ppl-seq-len", "512", "--ckpt-interval", "25", "--log-interval", "25",
           *[f.format(out=out) for f in TRAINED[arm]]]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    # stopped before its first state.pt: nothing to keep, so start that arm over
    run(cmd + (["--resume"] if (run_dir / "state.pt").exists() else ["--overwrite"]), args.threads)
    return run_dir


def oneshot_arm(method, args, out):
    """sparsity.py 2:4 into <out>/<method> (reused if it is complete)."""
    run_dir = out / method
    if not (run_dir / "masks.safetensors").exists():
        cmd = [sys.executable, "sparsity.py", "--ckpt", args.ckpt, "--method", method, "--sparsity", "2:4",
               "--out", str(run_dir), "--overwrite", "--nsamples", str(args.nsamples), "--calib-len",
               str(args.calib_len), "--no-eval"]
        run(cmd + (["--data-dir", args.data_dir] if args.data_dir else []), args.threads)
    return run_dir


def flip_rates(run_dir):
    """(mean flip rate per mask update, share of the mask changed since the start) from the arm's log."""
    records = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    updates = [r for r in records if r.get("step", 0) > 0 and "flip_prev" in r]
    if not updates:
        return 0.0, 0.0
    return sum(r["flip_prev"] for r in updates) / len(updates), updates[-1]["flip_init"]


def score(path, args, data_dir):
    """The final protocol: WikiText-2 at 512 × first 16 and 2048 × first 8 windows (no BOS), four tasks."""
    model, tokenizer = load(path)
    result = {}
    for seq, windows in ((512, 16), (2048, 8)):
        wikitext = WikiText2(tokenizer, data_dir, seq, windows)
        result[f"ppl{seq}"] = wikitext(model)
        result[f"protocol{seq}"] = wikitext.describe()
    for task in TASKS:
        result[task] = evaluate_task(model, tokenizer, task, data_dir, limit=args.limit)["acc"]
    result["mean_acc"] = sum(result[t] for t in TASKS) / len(TASKS)
    return result


def table(results) -> str:
    rows = ["| arm | ppl 512×16 | ppl 2048×8 | " + " | ".join(TASKS) + " | mean acc | flips/update | changed | minutes |",
            "|---" * (7 + len(TASKS)) + "|"]
    for arm in ARMS:
        r = results.get(arm)
        if r is None:
            rows.append(f"| {arm} | (not run) |" + " |" * (6 + len(TASKS)))
            continue
        flips = (f"{100 * r['flip_update']:.2f}% | {100 * r['flip_total']:.2f}%" if "flip_update" in r else "– | –")
        rows.append(f"| {arm} | {r['ppl512']:.2f} | {r['ppl2048']:.2f} | "
                    + " | ".join(f"{r[t]:.3f}" for t in TASKS) + f" | {r['mean_acc']:.3f} | {flips} | "
                    f"{r['seconds'] / 60:.0f} |")
    return "\n".join(rows)


def plot(results, out, tokens_per_step):
    """Perplexity (4 windows of 512) over training tokens for each trained arm; dense as a line."""
    curves, dense = {}, None
    for arm in TRAINED:
        if (out / arm / "log.jsonl").exists():
            records = [json.loads(line) for line in open(out / arm / "log.jsonl")]
            dense = records[0].get("dense_ppl") or dense  # logged at step 0 on the same 4 windows
            curves[arm] = [(r["step"] * tokens_per_step, r["ppl"]) for r in records if r.get("ppl") is not None]
    training.plot_curves(curves, out / "study.png", "training tokens", "WikiText-2 ppl (first 4 windows of 512)",
                         hlines={f"dense {dense:.1f}": dense} if dense is not None else None)


def main(argv=None):
    args = parse_config(StudyArgs, argv)
    out = Path(args.out)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    settings = {k: v for k, v in asdict(args).items() if k not in ("out", "arms", "report", "threads", "data_dir")}
    if results.get("settings", settings) != settings:
        raise UserError(f"{results_path} was made with other settings ({results['settings']}); use another --out")
    results["settings"] = settings
    for arm in [] if args.report else [a for a in ARMS if a in arms and a not in results]:
        start = time.time()
        if arm == "ast_sparsegpt":
            oneshot_arm("sparsegpt", args, out)
        path = (args.ckpt if arm == "dense" else oneshot_arm(arm, args, out) if arm in ONESHOT
                else train_arm(arm, args, out) / "final")
        record = score(path, args, data_dir)
        if arm in TRAINED:
            record["flip_update"], record["flip_total"] = flip_rates(out / arm)
        record["seconds"] = time.time() - start
        record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip()
        results[arm] = record
        atomic_write(results_path, lambda p: Path(p).write_text(json.dumps(results, indent=1)))
        print(f"{arm}: {json.dumps(record)}", flush=True)
    print(table(results))
    plot(results, out, args.batch_size * args.seq_len)


if __name__ == "__main__":
    cli_main(main)
