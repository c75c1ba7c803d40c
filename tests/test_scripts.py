"""Every script, fed the bad input a new user types: one `error:` line naming the flag, exit status 1, and
for a flag's range no model loaded first. Also a resume of a damaged or finished run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import eval as eval_script
import rundir
import sparsity
import train_ast
import train_pat
import training
from cli import cli_main
from kernels24 import bench as kernels_bench
from kernels24 import pack as kernels_pack
from model import ModelArgs, Transformer
from tokenizer import GPT2_PATTERN, TiktokenTokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"eval": eval_script, "sparsity": sparsity, "train_ast": train_ast, "train_pat": train_pat,
           "kernels24.pack": kernels_pack, "kernels24.bench": kernels_bench}


def one_error_line(script, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: SCRIPTS[script].main(argv))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")
    for module in (checkpoint, eval_script, sparsity):  # eval and sparsity hold their own name for it
        monkeypatch.setattr(module, "load", refuse, raising=False)


RANGE_CASES = [  # (script, argv, what the line must say)
    ("eval", ["--ppl-seq-len", "0"], "--ppl-seq-len 0: must be positive"),
    ("eval", ["--ppl-seq-len", "-3"], "--ppl-seq-len -3: must be positive"),
    ("eval", ["--limit", "0"], "--limit 0: must be positive"),
    ("eval", ["--ppl-windows", "-1"], "--ppl-windows -1: must be 0 (all windows) or more"),
    ("sparsity", ["--ppl-seq-len", "0"], "--ppl-seq-len 0: must be positive"),
    ("sparsity", ["--ppl-windows", "-2"], "--ppl-windows -2: must be 0 (all windows) or more"),
    ("sparsity", ["--nsamples", "0"], "--nsamples 0: must be positive"),
    ("sparsity", ["--calib-len", "0"], "--calib-len 0: must be positive"),
    ("train_ast", ["--seq-len", "0"], "--seq-len 0: must be positive"),
    ("train_ast", ["--seq-len", "-1"], "--seq-len -1: must be positive"),
    ("train_ast", ["--batch-size", "0"], "--batch-size 0: must be positive"),
    ("train_ast", ["--mask-interval", "-1"], "--mask-interval -1: must be 0 (a fixed mask) or more"),
    ("train_ast", ["--log-interval", "0"], "--log-interval 0: must be positive"),
    ("train_ast", ["--max-steps", "0"], "--max-steps 0: must be positive"),
    ("train_ast", ["--ppl-windows", "-1"], "--ppl-windows -1: must be 0 (all windows) or more"),
    ("train_ast", ["--lr", "nan"], "--lr nan: must be a finite number"),
    ("train_ast", ["--lr", "inf"], "--lr inf: must be a finite number"),
    ("train_ast", ["--temperature", "inf"], "--temperature inf: must be a finite number"),
    ("train_ast", ["--decay-max=-inf"], "--decay-max -inf: must be a finite number"),
    ("train_pat", ["--mask-lr", "inf"], "--mask-lr inf: must be a finite number"),
    ("train_pat", ["--freeze-at", "nan"], "--freeze-at nan: must be a finite number"),  # a field without a range
    ("train_ast", ["--alpha", "1.5"], "--alpha 1.5: must be in [0, 1]"),
    ("train_ast", ["--seed", str(2 ** 70)], f"--seed {2 ** 70}: must be in [0, 2**63)"),
    ("train_pat", ["--batch-size", "0"], "--batch-size 0: must be positive"),
    ("train_pat", ["--log-interval", "0"], "--log-interval 0: must be positive"),
    ("train_pat", ["--max-steps", "0"], "--max-steps 0: must be positive"),
    ("train_pat", ["--ppl-windows", "-1"], "--ppl-windows -1: must be 0 (all windows) or more"),
    ("train_pat", ["--ratio", "1"], "--ratio 1.0: must be in [0, 1)"),
    ("kernels24.pack", ["--ckpt", "x", "--out", "y", "--group-size", "0"], "--group-size 0: must be positive"),
    ("kernels24.pack", ["--ckpt", "x", "--out", "y", "--percdamp", "0"],
     "--percdamp 0.0: must be positive (0 leaves a singular Hessian without damping; 0.01 is usual)"),
    ("kernels24.bench", ["--runs", "0"], "--runs 0: must be positive"),
]


@pytest.mark.parametrize("script,argv,says", RANGE_CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in RANGE_CASES])
def test_a_flag_out_of_range_is_one_line_before_any_model_loads(script, argv, says, capsys, no_model_loads):
    assert one_error_line(script, argv, capsys) == f"error: {says}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("script", ["eval", "sparsity", "train_ast", "train_pat"])
def test_device_cuda_without_a_gpu_is_one_line(script, capsys, no_model_loads):
    assert "--device cuda: torch" in one_error_line(script, ["--device", "cuda"], capsys)


def test_eval_json_into_a_missing_directory_fails_before_the_work(tmp_path, capsys, no_model_loads, data_dir):
    line = one_error_line("eval", ["--tasks", "wikitext2", "--data-dir", str(data_dir),
                                   "--json", str(tmp_path / "nowhere" / "r.json")], capsys)
    assert "nowhere" in line and "does not exist" in line


def test_resume_of_a_damaged_state_is_one_line(tmp_path, capsys, no_model_loads):
    for script in ("train_ast", "train_pat"):
        out = tmp_path / script
        out.mkdir()
        (out / "state.pt").write_bytes(b"PK\x03\x04 truncated")
        line = one_error_line(script, ["--out", str(out), "--resume"], capsys)
        assert str(out / "state.pt") in line and "truncated" in line and "--overwrite" in line


def a_state(script, step, **flags):
    """A state.pt's contents as `script` writes them: its kind, the defining flags of its defaults (or `flags`), the
    keys a resume reads (empty here)."""
    args = {"train_ast": train_ast.ASTArgs, "train_pat": train_pat.PATArgs}[script](**flags)
    return {**{key: {} for key in SCRIPTS[script].STATE_KEYS}, "step": step, **rundir.run_record(args, script)}


def test_resume_of_a_finished_run_says_so_and_touches_nothing(tmp_path, capsys, no_model_loads):
    for script in ("train_ast", "train_pat"):
        out = tmp_path / script
        training.save_state(out / "state.pt", a_state(script, 20))
        (out / "final").mkdir()
        (out / "final" / "meta.json").write_text(json.dumps({"ast_ppl": 957.62}))
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        SCRIPTS[script].main(["--out", str(out), "--resume", "--max-steps", "20"])
        assert "already finished 20 of --max-steps 20" in capsys.readouterr().out
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_malformed_instruction_line_is_one_line(tmp_path, capsys, data_dir):
    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=258, hidden_dim=64, max_seq_len=64))
    tok = TiktokenTokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256, "</s>": 257}, GPT2_PATTERN,
                            bos_id=256, eos_id=257, add_bos=True, specials_in_text=False, name="bytes")
    checkpoint.save(tiny, tok, tmp_path / "tiny")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    line = one_error_line("train_pat", ["--ckpt", str(tmp_path / "tiny"), "--data", str(bad), "--data-dir",
                                        str(data_dir), "--out", str(tmp_path / "run"), "--no-eval"], capsys)
    assert f"{bad}:2" in line


# ----------------------------------------------------------------------------- the trainers' --out and --resume

TRAINERS = ("train_ast", "train_pat")


def files_of(out) -> dict:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def a_run(out, script, step=3, **flags):
    """A run directory as `script` leaves it after `step` steps: state.pt, a log, a final/ export."""
    training.save_state(out / "state.pt", a_state(script, step, **flags))
    (out / "log.jsonl").write_text('{"step": 0}\n')
    (out / "final").mkdir()
    (out / "final" / "meta.json").write_text("{}")
    return files_of(out)


@pytest.mark.parametrize("script", TRAINERS)
def test_resume_with_other_defining_flags_names_each_and_touches_nothing(script, tmp_path, capsys, no_model_loads):
    out = tmp_path / "run"
    before = a_run(out, script, seq_len=32, ratio=0.25) if script == "train_pat" else a_run(out, script, seq_len=32)
    argv = ["--out", str(out), "--resume", "--max-steps", "10", "--seq-len", "64", "--no-eval"]
    line = one_error_line(script, argv + (["--ratio", "0.5"] if script == "train_pat" else ["--slorb-k", "16"]), capsys)
    assert line.startswith(f"error: --resume: {out / 'state.pt'} was started with --seq-len 32, --eval, ")
    assert ("--ratio 0.25, not --seq-len 64, --no-eval, --ratio 0.5;" in line if script == "train_pat"
            else "--slorb-k 0, not --seq-len 64, --no-eval, --slorb-k 16;" in line)
    assert "--max-steps" in line and files_of(out) == before
    # the flags that may change (how long, the NaN remedies, where and how fast) do not stop it
    argv = ["--out", str(out), "--resume", "--max-steps", "3", "--lr", "1e-6", "--warmup-steps", "9", "--seq-len", "32",
            "--data-dir", str(tmp_path), "--log-interval", "1", "--ckpt-interval", "1", "--eval-interval", "1"]
    SCRIPTS[script].main(argv + (["--ratio", "0.25"] if script == "train_pat" else []))
    assert "already finished 3 of --max-steps 3" in capsys.readouterr().out and files_of(out) == before


@pytest.mark.parametrize("script", TRAINERS)
def test_resume_of_another_kind_of_state_is_one_line(script, tmp_path, capsys, no_model_loads):
    other = TRAINERS[script == "train_ast"]
    out = tmp_path / "other"
    before = a_run(out, other)
    line = one_error_line(script, ["--out", str(out), "--resume"], capsys)
    assert line == f"error: --resume: {out / 'state.pt'} is a {other}.py run, not a {script}.py one; continue it " \
                   f"with {other}.py"
    training.save_state(out / "state.pt", {"step": 3, "model": {}})  # someone else's, or a torn dictionary
    assert f"{out / 'state.pt'} lacks " in one_error_line(script, ["--out", str(out), "--resume"], capsys)
    training.save_state(out / "state.pt", [1, 2])
    assert "not a state.pt of" in one_error_line(script, ["--out", str(out), "--resume"], capsys)
    training.save_state(out / "state.pt", a_state(script, 3) | {"kind": other})
    assert files_of(out).keys() == before.keys()


@pytest.mark.parametrize("script", TRAINERS)
def test_resume_of_an_older_state_without_flags_warns_and_goes_on(script, tmp_path, capsys, no_model_loads):
    """Our choice for a state.pt written before runs stored their flags: resume it, unchecked, and say so."""
    out = tmp_path / "old"
    state = a_state(script, 5)
    del state["kind"], state["flags"]
    training.save_state(out / "state.pt", state)
    (out / "final").mkdir()
    (out / "final" / "meta.json").write_text("{}")
    SCRIPTS[script].main(["--out", str(out), "--resume", "--max-steps", "5", "--seq-len", "7"])
    said = capsys.readouterr().out
    assert "records no flags (an older version wrote it): resuming with the flags given, unchecked" in said
    assert "already finished 5 of --max-steps 5" in said


BAD_OUTS = [("a file", lambda t: t / "afile", "is a file; --out is a directory"),
            ("under a file", lambda t: t / "afile" / "sub", "afile is a file, not a directory"),
            ("/proc/x", lambda t: Path("/proc/x"), "cannot create --out /proc/x")]


@pytest.mark.parametrize("script", TRAINERS)
@pytest.mark.parametrize("what,out,says", BAD_OUTS, ids=[b[0] for b in BAD_OUTS])
def test_an_out_that_cannot_be_written_is_one_line_before_any_model_loads(script, what, out, says, tmp_path, capsys,
                                                                         no_model_loads):
    (tmp_path / "afile").write_text("x")
    assert says in one_error_line(script, ["--out", str(out(tmp_path))], capsys)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("script", TRAINERS)
def test_overwrite_deletes_nothing_before_the_inputs_load(script, tmp_path, capsys):
    """A typo in --ckpt with --overwrite: the old run's files all stay (they used to be deleted first)."""
    out = tmp_path / "run"
    before = a_run(out, script)
    line = one_error_line(script, ["--out", str(out), "--overwrite", "--ckpt", "smollm2-135mm"], capsys)
    assert "unknown checkpoint 'smollm2-135mm'" in line and files_of(out) == before


@pytest.mark.parametrize("script", TRAINERS)
def test_an_out_holding_or_inside_an_input_is_refused(script, tmp_path, capsys, no_model_loads):
    out = tmp_path / "run"
    before = a_run(out, script)
    for argv, says in (
            (["--ckpt", str(out / "final"), "--out", str(out), "--overwrite"], f"--out {out} holds --ckpt {out / 'final'}"),
            (["--ckpt", str(out), "--out", str(out / "final" / "next")], f"--out {out / 'final' / 'next'} is inside --ckpt"),
            (["--ckpt", str(out), "--out", str(out), "--resume"], f"--out {out} holds --ckpt {out}")):
        assert says in one_error_line(script, argv, capsys)
    if script == "train_ast":
        line = one_error_line(script, ["--init-mask", str(out / "final"), "--out", str(out), "--overwrite"], capsys)
        assert f"--out {out} holds --init-mask {out / 'final'}" in line
    assert files_of(out) == before and not (out / "final" / "next").exists()


def test_init_mask_that_does_not_exist_names_init_mask(tmp_path, capsys, no_model_loads):
    line = one_error_line("train_ast", ["--init-mask", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert line.startswith(f"error: --init-mask {tmp_path / 'missing'}: no such directory")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", TRAINERS)
def test_resume_and_overwrite_together_is_one_line(script, tmp_path, capsys, no_model_loads):
    out = tmp_path / "run"
    before = a_run(out, script)
    assert "pass one of them" in one_error_line(script, ["--out", str(out), "--resume", "--overwrite"], capsys)
    assert files_of(out) == before


@pytest.mark.parametrize("script", TRAINERS)
def test_a_second_run_into_a_locked_out_names_the_first(script, tmp_path, capsys, no_model_loads, another_run_locks):
    out = tmp_path / "run"
    out.mkdir()
    pid = another_run_locks(out)
    for argv in (["--out", str(out)], ["--out", str(out), "--overwrite"], ["--out", str(out), "--resume"]):
        line = one_error_line(script, argv, capsys)
        assert line == f"error: --out {out.resolve()} is in use by another run (pid {pid}); wait for it " \
                       f"to end, or choose another --out"
# ----------------------------------------------------------------------------- bench/ scripts (run as a user runs them)

def run_bench(script, *argv, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def bench_error(script, *argv, cwd=ROOT) -> str:
    run = run_bench(script, *argv, cwd=cwd)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr
    return run.stderr.strip()


def test_baselines_table_checks_names_and_its_table_before_the_model_loads(tmp_path, data_dir):
    """A typo in --methods or --patterns, or an earlier table in --out: one line before the model loads (the
    checkpoint named here does not exist), the earlier table untouched."""
    table = tmp_path / "baselines_table.json"
    argv = ["--ckpt", tmp_path / "no-model", "--data-dir", data_dir, "--out", tmp_path]
    assert bench_error("baselines_table.py", *argv, "--methods", "wanda,sparsgpt") == (
        "error: --methods: unknown method 'sparsgpt'; choose from magnitude, wanda, sparsegpt")
    assert bench_error("baselines_table.py", *argv, "--patterns", "2:4,5:4").startswith("error: --patterns: bad sparsity '5:4'")
    table.write_text('{"an earlier": "table"}')
    assert bench_error("baselines_table.py", *argv) == (
        f"error: {table} already holds a table: continue it with --resume, replace it with --overwrite, or choose "
        f"another --out")
    assert table.read_text() == '{"an earlier": "table"}'
    assert "unknown checkpoint" in bench_error("baselines_table.py", *argv, "--overwrite")  # now it loads


def test_baselines_table_resumes_only_its_own_protocol(tmp_path, data_dir):
    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, hidden_dim=64, max_seq_len=64))
    checkpoint.save(tiny, None, tmp_path / "tiny")
    shutil.copy(data_dir / "tokenizers" / "llama2" / "tokenizer.model", tmp_path / "tiny")
    argv = ["--ckpt", tmp_path / "tiny", "--data-dir", data_dir, "--out", tmp_path / "o", "--methods", "magnitude",
            "--patterns", "2:4", "--nsamples", "1", "--calib-len", "16", "--ppl-seq-len", "32", "--ppl-windows", "1",
            "--device", "cpu"]
    first = run_bench("baselines_table.py", *argv)
    assert first.returncode == 0, first.stderr
    table = tmp_path / "o" / "baselines_table.json"
    written = table.read_text()
    assert [r["method"] for r in json.loads(written)["runs"]] == ["magnitude"]
    again = run_bench("baselines_table.py", *argv, "--resume")
    assert again.returncode == 0 and "1 runs done" in again.stdout and table.read_text() == written
    other = [*argv[:-4], "--ppl-windows", "2", "--device", "cpu", "--resume"]  # another protocol: not mixed in
    assert "cannot resume" in bench_error("baselines_table.py", *other) and table.read_text() == written


@pytest.mark.parametrize("argv, says", [
    (["--ratio", "1.5"], "--ratio 1.5: must be in [0, 1)"),
    (["--shapes", "1x0"], "--shapes 1x0: batch and length must be positive, e.g. 1x128"),
    (["--ckpt", "/no/model"], "unknown checkpoint '/no/model'"),
])
def test_bench_pat_speed_bad_flags_are_one_line(argv, says):
    """--ratio 1.5 used to report a 12x speedup from a model 'merged' to a width of 8; the rest were tracebacks."""
    assert bench_error("bench_pat_speed.py", *argv).startswith(f"error: {says}")
