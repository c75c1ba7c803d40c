"""rundir.py: which flags define a run, compared the same from any working directory; the rest is driven through the
trainers in test_scripts.py (no model), test_ast_runs.py and test_pat.py (tiny runs)."""
import pytest

import rundir
from cli import UserError
from train_ast import ASTArgs


def test_run_flags_leave_out_what_may_change_and_compare_paths_absolutely(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    flags = rundir.run_flags(ASTArgs(ckpt="ckpt", max_steps=7, lr=1.0, seq_len=64))
    assert not set(flags) & set(rundir.RESUMABLE_FLAGS) and flags["seq_len"] == 64
    assert flags["ckpt"] == str(tmp_path / "ckpt") and rundir.run_flags(ASTArgs(ckpt="smollm2-135m"))["ckpt"] == "smollm2-135m"
    state = {"step": 1, **rundir.run_record(ASTArgs(ckpt="ckpt"), "train_ast")}
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same checkpoint by another relative path
    rundir.check_resume(state, ASTArgs(ckpt="../ckpt", max_steps=99, lr=2.0), "train_ast", (), "state.pt")
    with pytest.raises(UserError, match=f"started with --ckpt {tmp_path / 'ckpt'}, not --ckpt {tmp_path / 'elsewhere'}"):
        rundir.check_resume(state, ASTArgs(ckpt="."), "train_ast", (), "state.pt")
