"""cli.py: config dataclass -> flags (comments as --help, Literal as choices, ranges), one-line errors,
atomic writes, the progress line."""
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import cli
from cli import (DTYPES, RANGES, DType, Device, Progress, UserError, atomic_write, autocast, check_config,
                 check_output_file, cli_main, field_comments, parse_config, resolve_device)


@dataclass
class Base:
    """A made-up script."""
    max_steps: int = 100  # optimizer steps
    lr: float = 3e-4  # peak learning rate
    seq_len: int = 2048  # tokens per window
    warmup_steps: int = 0  # 10% of the steps is typical
    limit: int | None = None  # at most this many records (None: all)
    note: str | None = None  # a free-form note
    compile: bool = False  # torch.compile the model
    eval: bool = True  # evaluate at the start and the end
    dtype: DType = "float32"  # weight dtype
    device: Device = "cpu"  # where to run


@dataclass
class Sub(Base):
    seq_len: int = 64
    lr: float = 1e-3  # a smaller model takes a larger step
    ratio: float = 0.5  # fraction of the width removed
    out: str = "out/sub"


# ----------------------------------------------------------------------------- parse_config

def test_one_flag_per_field_with_its_type():
    c = parse_config(Sub, ["--max-steps", "7", "--lr", "2e-4", "--limit", "3", "--note", "hi", "--dtype", "bfloat16",
                           "--ratio", "0", "--out", "/tmp/x", "--seq-len", "16"])
    assert isinstance(c, Sub)
    assert (c.max_steps, c.lr, c.limit, c.note, c.dtype, c.ratio, c.out, c.seq_len) == (
        7, 2e-4, 3, "hi", "bfloat16", 0.0, "/tmp/x", 16)
    assert isinstance(c.ratio, float) and isinstance(c.max_steps, int)
    d = parse_config(Sub, [])
    assert d == Sub() and d.seq_len == 64 and d.limit is None and d.note is None  # defaults, the subclass's first
    with pytest.raises(SystemExit) as e:
        parse_config(Sub, ["--max-steps", "seven"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parse_config(Sub, ["--max_steps", "7"])  # flags are spelled with dashes


def test_bool_fields_are_flag_and_no_flag_and_take_no_value():
    assert parse_config(Base, ["--compile", "--no-eval"]) == Base(compile=True, eval=False)
    assert parse_config(Base, ["--no-compile", "--eval"]) == Base()
    for argv in (["--compile", "False"], ["--eval=0"], ["--no-eval", "yes"]):
        with pytest.raises(SystemExit) as e:  # no argparse type=bool trap: "False" would be True
            parse_config(Base, argv)
        assert e.value.code == 2


def help_text(cls, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse_config(cls, ["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces


def test_help_shows_each_fields_comment_and_choices(capsys):
    text = help_text(Base, capsys)
    assert "A made-up script." in text
    for f in dataclasses.fields(Base):
        assert cli.flag(f.name) in text
    assert "--max-steps MAX_STEPS optimizer steps (default: 100)" in text
    assert "--lr LR peak learning rate" in text
    assert "10% of the steps is typical" in text  # a % in a comment is not a format directive
    assert "--compile, --no-compile torch.compile the model" in text
    assert "--eval, --no-eval evaluate at the start and the end (default: True)" in text
    assert "--dtype {float32,bfloat16,float16} weight dtype" in text
    assert "--device {auto,cpu,cuda} where to run" in text


def test_a_subclass_inherits_comments_unless_it_writes_its_own(capsys):
    assert field_comments(Sub)["seq_len"] == "tokens per window"  # overridden default, no comment: the base's
    assert field_comments(Sub)["lr"] == "a smaller model takes a larger step"  # its own comment wins
    assert "out" not in field_comments(Sub)  # no comment anywhere
    text = help_text(Sub, capsys)
    assert "--seq-len SEQ_LEN tokens per window (default: 64)" in text
    assert "--lr LR a smaller model takes a larger step (default: 0.001)" in text
    assert "peak learning rate" not in text
    assert "--ratio RATIO fraction of the width removed" in text


def test_literal_fields_are_choices(capsys):
    assert parse_config(Base, ["--dtype", "float16", "--device", "auto"]).dtype == "float16"
    with pytest.raises(SystemExit) as e:
        parse_config(Base, ["--dtype", "fp8"])
    assert e.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    assert set(typing.get_args(DType)) == set(DTYPES)  # every --dtype value names a torch dtype


# ----------------------------------------------------------------------------- ranges

def test_ranges_are_checked_before_any_work_and_name_the_flag():
    with pytest.raises(UserError, match=r"^--seq-len 0: must be positive$"):
        parse_config(Sub, ["--seq-len", "0"])
    with pytest.raises(UserError, match=r"^--max-steps -3: must be positive$"):
        parse_config(Sub, ["--max-steps", "-3"])
    with pytest.raises(UserError, match=r"^--warmup-steps -1: must be 0 or more$"):
        parse_config(Sub, ["--warmup-steps", "-1"])
    with pytest.raises(UserError, match=r"^--ratio 1.0: must be in \[0, 1\)$"):
        parse_config(Sub, ["--ratio", "1"])
    with pytest.raises(UserError, match=r"^--limit 0: must be positive$"):
        parse_config(Sub, ["--limit", "0"])
    assert parse_config(Sub, ["--warmup-steps", "0", "--ratio", "0.99"]).ratio == 0.99  # edges that are in range
    assert check_config(Sub(limit=None)).limit is None  # None (where a field allows it) always passes
    with pytest.raises(UserError, match="--seq-len 0"):
        check_config(Sub(seq_len=0))  # a config made in code is checked the same way


def test_every_range_refuses_a_negative_and_says_what_it_accepts():
    for name, (accepts, words) in RANGES.items():
        assert not accepts(-1), name
        assert words.startswith("must "), name


def test_device_cuda_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="--device cuda: .* sees no CUDA GPU here; use --device cpu"):
        parse_config(Base, ["--device", "cuda"])
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_device_and_autocast():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with autocast(torch.float32, "cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with autocast(torch.bfloat16, "cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- files

def test_check_output_file(tmp_path):
    assert check_output_file(tmp_path / "r.json") == tmp_path / "r.json"
    assert isinstance(check_output_file(str(tmp_path / "r.json")), Path)
    with pytest.raises(UserError, match=f"cannot write .*: the directory {tmp_path / 'missing'} does not exist"):
        check_output_file(tmp_path / "missing" / "r.json")


def test_atomic_write_never_leaves_half_a_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write(path, lambda p: Path(p).write_text("old"))  # makes the directory
    assert path.read_text() == "old"

    def crash(p):
        Path(p).write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]  # no temporary file left behind
    atomic_write(path, lambda p: Path(p).write_text("new"))
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["f.txt"]


# ----------------------------------------------------------------------------- progress

@pytest.fixture
def clock(monkeypatch):
    """A settable time.perf_counter: clock.now = seconds."""
    class Clock:
        now = 100.0
    c = Clock()
    monkeypatch.setattr(cli.time, "perf_counter", lambda: c.now)
    return c


def test_progress_line(clock):
    p = Progress("step", 100)
    clock.now += 2
    assert p.line(10, tokens=1000, loss=2.5, kl=None) == "step 10/100 | loss 2.5 | 500 tok/s | ETA 0m18s"
    clock.now += 2
    assert p.line(20) == "step 20/100 | 5.00 steps/s | ETA 0m16s"
    clock.now += 1
    assert p.line(20, tokens=300, lr=1.234567e-4) == "step 20/100 | lr 0.0001235 | 300 tok/s | ETA 0m20s"
    resumed = Progress("step", 100, start=50)  # rate and ETA count only what this run did
    assert resumed.line(50) == "step 50/100 | 0.00 steps/s | ETA 0m00s"
    clock.now += 10
    assert resumed.line(60) == "step 60/100 | 1.00 steps/s | ETA 0m40s"
    slow = Progress("layer", 30, unit="layers")
    clock.now += 600
    assert slow.line(10) == "layer 10/30 | 0.02 layers/s | ETA 20m00s"


def test_progress_redraw_once_a_second_and_ends_the_line(clock, capsys):
    p = Progress("window", 4, unit="windows")
    for t, done in ((0.2, 1), (0.5, 2), (1.3, 3), (1.4, 4)):
        clock.now = 100 + t
        p.redraw(done)
    err = capsys.readouterr().err
    assert [line.split(" |")[0] for line in err.split("\r")[1:]] == ["window 1/4", "window 3/4", "window 4/4"]
    assert err.endswith("\n") and err.count("\n") == 1  # only the last redraw ends the line


# ----------------------------------------------------------------------------- cli_main

def test_cli_main_turns_a_user_error_into_one_line_and_exit_1(capsys):
    def bad():
        raise UserError("--seq-len 0: must be positive")
    with pytest.raises(SystemExit) as e:
        cli_main(bad)
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert err == "error: --seq-len 0: must be positive\n" and out == ""

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli_main(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"

    ran = []
    cli_main(lambda: ran.append(1))  # a normal run returns
    assert ran == [1]
    with pytest.raises(ValueError):  # a bug is not bad input: its traceback stays
        cli_main(lambda: int("x"))


# ----------------------------------------------------------------------------- bad values and output places

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_number_is_refused_by_name(value):
    """inf passes `> 0` and nan fails every test without saying why: both are refused as not finite, range or not."""
    with pytest.raises(UserError, match=rf"^--lr {value}: must be a finite number$"):
        parse_config(Sub, [f"--lr={value}"])
    @dataclass
    class Free:
        scale: float = 1.0  # a float with no range
    with pytest.raises(UserError, match=rf"^--scale {value}: must be a finite number$"):
        parse_config(Free, [f"--scale={value}"])


def test_check_output_file_tests_the_place_and_leaves_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    for path, says in ((tmp_path, "it is a directory"), (tmp_path / "afile" / "r.json", "afile is a file"),
                       (tmp_path / "afile" / "deeper" / "r.json", "afile is a file"),
                       (Path("/proc/r.json"), "cannot write /proc/r.json: .* in /proc")):
        with pytest.raises(UserError, match=says):
            check_output_file(path)
    with pytest.raises(UserError, match=f"^cannot write --json {tmp_path}: it is a directory"):
        check_output_file(tmp_path, flag="--json")
    assert check_output_file(tmp_path / "r.json") == tmp_path / "r.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no probe file, no output file left


def test_check_output_file_reports_an_unwritable_directory(tmp_path, monkeypatch):
    """Root writes anywhere chmod allows; a refusing filesystem is simulated."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "touch", refuse)
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'r.json'}: permission denied in {tmp_path}"):
        check_output_file(tmp_path / "r.json")
    with pytest.raises(UserError, match=f"cannot write --out {tmp_path / 'run'}: permission denied"):
        cli.check_output_dir(tmp_path / "run")


def test_check_output_dir_makes_and_tests_the_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    for path, says in ((tmp_path / "afile", "--out .*afile is a file; --out is a directory"),
                       (tmp_path / "afile" / "sub", "cannot create --out .*afile/sub: .*afile is a file"),
                       (Path("/proc/x"), "cannot create --out /proc/x: no such file or directory"),
                       (Path("/proc/self/x/y"), "cannot create --out /proc/self/x/y")):
        with pytest.raises(UserError, match=says):
            cli.check_output_dir(path)
    made = cli.check_output_dir(tmp_path / "new" / "run")
    assert made.is_dir() and list(made.iterdir()) == []  # made, tested, nothing left in it
    (made / cli.LOCK_FILE).write_text("123\n")  # a run's lock file is not content
    assert cli.check_output_dir(made) == made
    (made / "state.pt").write_text("x")
    with pytest.raises(UserError, match="already holds state.pt: choose another --out"):
        cli.check_output_dir(made)


LOCK_HOLDER = ("import sys, time; sys.path.insert(0, {root!r}); import cli; cli.lock_dir({path!r}); "
               "print('locked', flush=True); time.sleep(120)")


def test_lock_dir_names_the_other_process_and_a_dead_ones_lock_never_blocks(tmp_path):
    import subprocess
    import sys
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(root=str(Path(cli.__file__).parent),
                                                                          path=str(run))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"^--out {run} is in use by another run \(pid {holder.pid}\); wait"):
            cli.lock_dir(run)
    finally:
        holder.kill()  # SIGKILL: no clean-up, its pid file stays
        holder.wait()
    assert (run / cli.LOCK_FILE).read_text().strip() == str(holder.pid)  # stale
    cli.lock_dir(run)
    cli.lock_dir(run)  # re-entrant within a process
    assert (run / cli.LOCK_FILE).read_text().strip() == str(__import__("os").getpid())
    cli.release_locks()
    assert not (run / cli.LOCK_FILE).exists()


# ----------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("writer", ["torch_save", "safetensors", "oserror"])
def test_atomic_write_on_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, writer, full_disk):
    write = (lambda p: full_disk.torch_save({}, p)) if writer == "torch_save" else getattr(full_disk, writer)
    path = tmp_path / "f.bin"
    with pytest.raises(cli.DiskFull, match=rf"^the disk is full: could not write {path} \(.* MiB free\); nothing was "
                                           "written there$"):
        atomic_write(path, write)
    atomic_write(path, lambda p: Path(p).write_text("good"))
    with pytest.raises(cli.DiskFull, match="the previous f.bin there is kept as it was$"):
        atomic_write(path, write)
    assert path.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(RuntimeError, match="unrelated"):  # any other failure is not called a full disk
        atomic_write(path, lambda p: (_ for _ in ()).throw(RuntimeError("unrelated")))


def test_cli_main_reports_a_full_disk_anywhere_as_one_line(capsys):
    def full():
        raise OSError(28, "No space left on device", "out/log.jsonl")
    with pytest.raises(SystemExit) as e:
        cli_main(full)
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: the disk is full writing out/log.jsonl; free some space and run again\n"
    with pytest.raises(OSError):  # another OSError is a bug or a setup problem: its traceback stays
        cli_main(lambda: (_ for _ in ()).throw(OSError(5, "Input/output error")))


def test_cli_main_reports_memory_run_out_as_one_line(capsys):
    """--batch-size 100000 ended in torch's allocator traceback; a CUDA OOM names its size in another form."""
    with pytest.raises(SystemExit) as e:
        cli_main(lambda: torch.empty(2 ** 50, dtype=torch.uint8))  # a real failed CPU allocation, 1 PiB
    assert e.value.code == 1
    hint = "use smaller batches or shorter sequences (--batch-size, --seq-len, --nsamples: see --help)\n"
    assert capsys.readouterr().err == f"error: out of memory on the CPU (tried to allocate 1048576.00 GiB): {hint}"

    def cuda_oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 3.12 GiB is free.")
    with pytest.raises(SystemExit):
        cli_main(cuda_oom)
    assert capsys.readouterr().err == f"error: out of memory on the GPU (tried to allocate 20.00 GiB): {hint}"
    with pytest.raises(RuntimeError, match="shapes cannot"):  # another RuntimeError is a bug: its traceback stays
        cli_main(lambda: torch.zeros(2, 3) @ torch.zeros(2, 3))


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "final"

    def interrupted(d):
        d.mkdir()
        (d / "a").write_text("new")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        cli.atomic_dir(final, interrupted)
    assert list(tmp_path.iterdir()) == []  # no final/, no temporary folder
    cli.atomic_dir(final, lambda d: (d.mkdir(), (d / "a").write_text("one")))
    with pytest.raises(KeyboardInterrupt):
        cli.atomic_dir(final, interrupted)
    assert (final / "a").read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["final"]
    cli.atomic_dir(final, lambda d: (d.mkdir(), (d / "b").write_text("two")))
    assert [p.name for p in final.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["final"]
