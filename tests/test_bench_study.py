"""The studies' reports, run as their commands on made-up finished runs: bench/ast_study.py --report (mean and
spread over seeds, step counts kept apart) and bench/pat_quality.py --report (the schedule that --budget scales);
a --report into a folder with no runs is one error line."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("arc_easy", "piqa", "winogrande", "hellaswag")
AST_SETTINGS = {"ckpt": "smollm2-135m", "max_steps": 200, "batch_size": 4, "seq_len": 128, "lr": 2e-4,
                "warmup_steps": 10, "curve_interval": 50, "nsamples": 64, "calib_len": 512, "limit": 200}


def run(script, *argv):
    return subprocess.run([sys.executable, f"bench/{script}", *argv], cwd=ROOT, capture_output=True, text=True)


def ast_results(folder, ppl2048, seed=None, max_steps=200):
    """A results.json with the arms ast (ppl 2048 as given) and fixed_kd (fixed numbers)."""
    arm = lambda ppl: {"ppl512": 2 * ppl, "ppl2048": ppl, **dict.fromkeys(TASKS, 0.5), "mean_acc": 0.5,  # noqa: E731
                       "flip_update": 0.0, "flip_total": 0.0, "seconds": 600.0}
    settings = {**AST_SETTINGS, "max_steps": max_steps, **({} if seed is None else {"seed": seed})}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"settings": settings, "ast": arm(ppl2048), "fixed_kd": arm(80.0)}))


def test_ast_report_gives_mean_and_half_range_over_seeds_per_step_count(tmp_path):
    ast_results(tmp_path, 100.0)  # seed 0 from before --seed: no seed in its settings
    ast_results(tmp_path / "seed1", 90.0, seed=1)
    ast_results(tmp_path / "seed2", 110.0, seed=2)
    ast_results(tmp_path / "steps600", 60.0, seed=0, max_steps=600)
    done = run("ast_study.py", "--report", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    short, long = done.stdout.split("200 steps x 4 x 128 = 102,400 tokens, seeds 0, 1, 2")[1].split(
        "600 steps x 4 x 128 = 307,200 tokens, seeds 0")
    row = next(line for line in short.splitlines() if line.startswith("| ast |"))
    assert "| 0,1,2 | 200.00 ±10.0% (180.00–220.00) | 100.00 ±10.0% (90.00–110.00) |" in row
    assert "| fixed_kd | 0,1,2 | 160.00 ±0.0% (160.00–160.00) | 80.00 ±0.0% (80.00–80.00) |" in short
    assert "| ast | 0 | 120.00 | 60.00 | 0.500 |" in long  # one seed: no spread
    assert (tmp_path / "budget.png").exists()


def pat_record(arm, ppl):
    return {"arm": arm, "dim": 432, "params": 100.9e6, "ppl": ppl, "ppl_protocol": "4 windows of 512",
            "acc": dict.fromkeys(TASKS, 0.5), "acc_norm": dict.fromkeys(TASKS, 0.5), "curve": [(0, 30.0), (50, ppl)],
            "before": 30.0}


def test_pat_budget_scales_steps_s0_freeze_and_warmup_together(tmp_path):
    for folder, ppl in ((tmp_path, 130.0), (tmp_path / "budget3", 110.0)):
        folder.mkdir(exist_ok=True)
        for arm in ("pat_rms", "prune_lora"):
            (folder / f"{arm}.json").write_text(json.dumps(pat_record(arm, ppl)))
    done = run("pat_quality.py", "--report", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert ("budget 1: 600 steps x 2 x 128 = 153,600 training tokens per arm (--data text), warmup 30; "
            "PAT: s0 200, mask frozen from step 160;") in done.stdout
    assert ("budget 3: 1,800 steps x 2 x 128 = 460,800 training tokens per arm (--data text), warmup 90; "
            "PAT: s0 600, mask frozen from step 480;") in done.stdout
    assert (tmp_path / "budget3" / "results.md").exists() and (tmp_path / "budget.png").exists()


def test_a_report_of_a_folder_without_runs_is_one_line(tmp_path):
    for script in ("ast_study.py", "pat_quality.py"):
        done = run(script, "--report", "--out", str(tmp_path / "missing"))
        err = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(err) == 1 and err[0].startswith("error: --out "), done.stderr
