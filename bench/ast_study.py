"""
AST's ablations at our scale: which of the paper's orderings hold on SmolLM2-135M (arXiv 2407.20584, §4 and
its ablation table). The same hyper-parameters for every arm, fixed before the runs (the StudyArgs defaults below);
a seed sets the data order and the one-shot calibration sample; every final model scored on the same protocol.

    python bench/ast_study.py                          # every arm into out/ast_study/ (hours on a 2-core CPU)
    python bench/ast_study.py --arms dense,ast         # some arms
    python bench/ast_study.py --arms ast,fixed_kd --seed 1             # another seed: out/ast_study/seed1/
    python bench/ast_study.py --arms ast --max-steps 600               # 3x the tokens: out/ast_study/steps600/
    python bench/ast_study.py --report                 # the tables and the PNGs from the results, no work

Where a run lives: seed 0 at the study's 200 steps in <out> itself, another step count in <out>/steps<N>, another
seed in a seed<N> folder below either. --report reads every one of them: per arm and step count, the mean over
the seeds present and its spread (± half the range, min–max), and <out>/budget.png, final perplexity against
training tokens for each trained arm run at two step counts or more (mean, bars from the lowest seed to the
highest).

Resumable: each finished arm is recorded in its folder's results.json and skipped on the next run; an arm stopped
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
    out: str = "out/ast_study"  # results.json, study.png, one folder per arm (other seeds and step counts below it)
    arms: str = ",".join(ARMS)  # comma list of arms to run (see the docstring)
    report: bool = False  # only print the tables and draw the PNGs from every results.json in --out, no work
    seed: int = 0  # training data order (train_ast --seed) and one-shot calibration sample (sparsity --seed)
    data_dir: str | None = None  # default ./data, then ../shared/data
    # training, identical for every trained arm (the README demo's settings, 200 steps)
    max_steps: int = 200  # optimizer steps per trained arm
    batch_size: int = 4  # sequences per step
    seq_len: int = 128  # training window length
    lr: float = 2e-4  # peak learning rate (cosine to 0.1×, warmup below)
    warmup_steps: int = 10  # linear warmup steps
    curve_interval: int = 50  # steps between the 4-window perplexities of the curve
    # one-shot calibration (Wanda, SparseGPT): C4 windows drawn with --seed
    nsamples: int = 64  # calibration windows
    calib_len: int = 512  # tokens per calibration window
    # the final scoring of every model
    limit: int = 200  # records per zero-shot task
    threads: int = 0  # torch threads for every step (0: torch's default)


def run_root(out: Path, seed: int, max_steps: int) -> Path:
    """The folder of one seed at one step count: <out> for seed 0 at the study's steps, else steps<N>/, seed<N>/."""
    root = out if max_steps == StudyArgs.max_steps else out / f"steps{max_steps}"
    return root if seed == 0 else root / f"seed{seed}"


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
           "--seed", str(args.seed), *[f.format(out=out) for f in TRAINED[arm]]]
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
               str(args.calib_len), "--seed", str(args.seed), "--no-eval"]
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


def spread(values) -> tuple[float, float, float, float]:
    """(mean, min, max, half the range as a % of the mean) of one number over seeds."""
    mean = sum(values) / len(values)
    return mean, min(values), max(values), 100 * (max(values) - min(values)) / 2 / mean


def cell(values, digits) -> str:
    """The mean; over two seeds or more also ± half the range in % and the range itself."""
    mean, low, high, half = spread(values)
    return f"{mean:.{digits}f}" + (f" ±{half:.1f}% ({low:.{digits}f}–{high:.{digits}f})" if len(values) > 1 else "")


def table(runs) -> str:
    """One row per arm: mean over the seeds that ran it ({seed: results}); perplexity and accuracy with their spread."""
    rows = ["| arm | seeds | ppl 512×16 | ppl 2048×8 | " + " | ".join(TASKS) +
            " | mean acc | flips/update | changed | minutes |", "|---" * (8 + len(TASKS)) + "|"]
    for arm in ARMS:
        seeds = sorted(seed for seed, results in runs.items() if arm in results)
        if not seeds:
            rows.append(f"| {arm} | (not run) |" + " |" * (6 + len(TASKS)))
            continue
        records = [runs[seed][arm] for seed in seeds]
        mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
        flips = (f"{100 * mean('flip_update'):.2f}% | {100 * mean('flip_total'):.2f}%" if "flip_update" in records[0]
                 else "– | –")
        rows.append(f"| {arm} | {','.join(map(str, seeds))} | {cell([r['ppl512'] for r in records], 2)} | "
                    f"{cell([r['ppl2048'] for r in records], 2)} | " + " | ".join(f"{mean(t):.3f}" for t in TASKS) +
                    f" | {cell([r['mean_acc'] for r in records], 3)} | {flips} | {mean('seconds') / 60:.0f} |")
    return "\n".join(rows)


def plot(root, tokens_per_step):
    """Perplexity (4 windows of 512) over training tokens for each trained arm of one folder; dense as a line."""
    curves, dense = {}, None
    for arm in TRAINED:
        if (root / arm / "log.jsonl").exists():
            records = [json.loads(line) for line in open(root / arm / "log.jsonl")]
            dense = records[0].get("dense_ppl") or dense  # logged at step 0 on the same 4 windows
            curves[arm] = [(r["step"] * tokens_per_step, r["ppl"]) for r in records if r.get("ppl") is not None]
    if curves:
        training.plot_curves(curves, root / "study.png", "training tokens", "WikiText-2 ppl (first 4 windows of 512)",
                             hlines={f"dense {dense:.1f}": dense} if dense is not None else None)


def find_runs(out):
    """Every results.json under --out grouped by its settings but the seed: [(settings, {seed: (folder, results)})],
    fewest steps first."""
    groups = {}
    for path in [out / "results.json", *out.glob("seed*/results.json"), *out.glob("steps*/results.json"),
                 *out.glob("steps*/seed*/results.json")]:
        if path.exists():
            results = json.loads(path.read_text())
            settings = {"seed": 0, **results.pop("settings")}  # results made before --seed are seed 0
            seed = settings.pop("seed")
            groups.setdefault(json.dumps(settings, sort_keys=True), (settings, {}))[1][seed] = (path.parent, results)
    return sorted(groups.values(), key=lambda group: group[0]["max_steps"])


def plot_budget(groups, png_path):
    """Final perplexity against training tokens for every trained arm run at two step counts or more: the mean
    over seeds, bars from the lowest seed to the highest, one panel per WikiText-2 protocol."""
    trends = {}
    for settings, runs in groups:
        tokens = settings["max_steps"] * settings["batch_size"] * settings["seq_len"]
        for arm in TRAINED:
            if records := [results[arm] for _, results in runs.values() if arm in results]:
                trends.setdefault(arm, []).append((tokens, records))
    trends = {arm: points for arm, points in trends.items() if len(points) > 1}
    if not trends:
        print(f"no {png_path.name}: no trained arm has run at two step counts yet")
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"skipping the plot {png_path}: pip install matplotlib")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, protocol in zip(axes, ("ppl512", "ppl2048"), ("512 × first 16", "2048 × first 8")):
        for arm, points in trends.items():
            stats = [spread([r[key] for r in records]) for _, records in points]
            means = [s[0] for s in stats]
            ax.errorbar([tokens for tokens, _ in points], means, capsize=3, marker="o", label=arm,
                        yerr=[[m - s[1] for m, s in zip(means, stats)], [s[2] - m for m, s in zip(means, stats)]])
        ax.set(xlabel="training tokens", ylabel=f"final WikiText-2 ppl ({protocol})", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="mean over seeds, bars min–max", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    print(f"budget trend: {png_path}")


def report(out):
    """The table of every step count found under --out (mean and spread over its seeds), the curves, the trend."""
    groups = find_runs(out)
    if not groups:
        raise UserError(f"--out {out}: no results.json in it or in its seed*/ or steps*/ folders; run the study "
                        f"into it first (python bench/ast_study.py --out {out})")
    for settings, runs in groups:
        tokens = settings["max_steps"] * settings["batch_size"] * settings["seq_len"]
        print(f"\n{settings['max_steps']} steps x {settings['batch_size']} x {settings['seq_len']} = {tokens:,} "
              f"tokens, seeds {', '.join(map(str, sorted(runs)))}; cells: mean ±half-range% (min–max) over seeds")
        print(table({seed: results for seed, (_, results) in runs.items()}))
        for root, _ in runs.values():
            plot(root, settings["batch_size"] * settings["seq_len"])
    plot_budget(groups, out / "budget.png")


def main(argv=None):
    args = parse_config(StudyArgs, argv)
    out = Path(args.out)
    if args.report:
        return report(out)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir)
    root = run_root(out, args.seed, args.max_steps)
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    settings = {k: v for k, v in asdict(args).items() if k not in ("out", "arms", "report", "threads", "data_dir")}
    if {"seed": 0, **results.get("settings", settings)} != settings:  # results made before --seed are seed 0
        raise UserError(f"{results_path} was made with other settings ({results['settings']}); use another --out")
    results["settings"] = settings
    for arm in [a for a in ARMS if a in arms and a not in results]:
        start = time.time()
        if arm == "ast_sparsegpt":
            oneshot_arm("sparsegpt", args, root)
        path = (args.ckpt if arm == "dense" else oneshot_arm(arm, args, root) if arm in ONESHOT
                else train_arm(arm, args, root) / "final")
        record = score(path, args, data_dir)
        if arm in TRAINED:
            record["flip_update"], record["flip_total"] = flip_rates(root / arm)
        record["seconds"] = time.time() - start
        record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip()
        results[arm] = record
        atomic_write(results_path, lambda p: Path(p).write_text(json.dumps(results, indent=1)))
        print(f"{arm}: {json.dumps(record)}", flush=True)
    if results_path.exists():
        report(out)


if __name__ == "__main__":
    cli_main(main)
