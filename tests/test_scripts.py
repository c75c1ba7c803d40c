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
    ("train_ast", ["--lr", "nan"], "--lr nan: must be positive"),
    ("train_ast", ["--alpha", "1.5"], "--alpha 1.5: must be in [0, 1]"),
    ("train_pat", ["--batch-size", "0"], "--batch-size 0: must be positive"),
    ("train_pat", ["--log-interval", "0"], "--log-interval 0: must be positive"),
    ("train_pat", ["--max-steps", "0"], "--max-steps 0: must be positive"),
    ("train_pat", ["--ppl-windows", "-1"], "--ppl-windows -1: must be 0 (all windows) or more"),
    ("train_pat", ["--ratio", "1"], "--ratio 1.0: must be in [0, 1)"),
    ("kernels24.pack", ["--ckpt", "x", "--out", "y", "--group-size", "0"], "--group-size 0: must be positive"),
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
        assert str(out / "state.pt") in line and "truncated" in line


def test_resume_of_a_finished_run_says_so_and_touches_nothing(tmp_path, capsys, no_model_loads):
    for script in ("train_ast", "train_pat"):
        out = tmp_path / script
        training.save_state(out / "state.pt", {"step": 20})
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
