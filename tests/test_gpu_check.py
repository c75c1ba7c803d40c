"""bench/gpu_check.sh without a GPU: --stage refuses a missing file and stamps the commit; a run without a stage stops in
one line; the CPU rehearsal (--rehearse) leaves one row per step and the log archive; a run killed after its second
step has already written those rows; the FSDP step fails on a crash; limits, order, kill grace; every flag the GPU run
passes exists (the commands recorded by GPU_CHECK_DRY_RUN, parsed as the scripts parse them)."""
import ast
import inspect
import os
import shlex
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
SCALE = "4"  # a shared 2-core CPU is slower than the GPU machine at starting Python: the rehearsal's limits times 4


def gpu_check(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def steps() -> list[list[str]]:
    """[name, limit, grace, needs, title] per step, in the order they run."""
    return [line.split(maxsplit=4) for line in gpu_check("--list").stdout.splitlines()]


def rows(md: Path) -> dict:
    """{title: result} of the results file's step table."""
    titles = {s[4] for s in steps()}
    cells = [line.split(" | ") for line in md.read_text().splitlines() if line.startswith("| ")]
    return {c[0][2:]: c[1] for c in cells if c[0][2:] in titles}


@pytest.fixture(scope="module")
def stage(tmp_path_factory, data_dir):
    """A real --stage (the shared data, SmolLM2's tokenizer) into a temporary folder."""
    path = tmp_path_factory.mktemp("stage") / "gpu_stage"
    done = gpu_check("--stage", env={"GPU_CHECK_STAGE": str(path), "DATA_DIR": str(data_dir)})
    assert done.returncode == 0, done.stderr
    return path, done.stdout


@pytest.fixture(scope="module")
def rehearsal(stage, tmp_path_factory):
    base = tmp_path_factory.mktemp("rehearsal")
    env = {"GPU_CHECK_STAGE": str(stage[0]), "GPU_CHECK_WORK": str(base / "work"), "GPU_CHECK_LIMIT_SCALE": SCALE}
    done = gpu_check("--rehearse", str(base / "results"), env=env, timeout=900)
    return base, done


@pytest.fixture(scope="module")
def tiny_ckpt(stage, tmp_path_factory):
    """The rehearsal's model (2 layers, random weights, the staged tokenizer), as its stage step writes it."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    subprocess.run([sys.executable, "bench/gpu_check.py", "stage", "--out", str(path), "--tokenizer",
                    str(stage[0] / "tokenizer"), "--shape", "tiny"], cwd=ROOT, check=True, capture_output=True)
    return path


def test_stage_fails_on_a_missing_file(tmp_path):
    done = gpu_check("--stage", env={"GPU_CHECK_STAGE": str(tmp_path / "stage"), "DATA_DIR": str(tmp_path)})
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "wikitext-2-raw/wiki.test.raw is missing" in done.stderr and "DATA_DIR" in done.stderr
    assert not (tmp_path / "stage").exists() and "staged" not in done.stdout


def test_stage_holds_what_the_steps_read_and_the_commit(stage):
    path, out = stage
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert (path / "COMMIT").read_text().startswith(commit.stdout.strip())
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == ["COMMIT", "data/text/redpajama-wiki1.jsonl", "data/text/tinyshakespeare.txt",
                     "data/wikitext-2-raw/wiki.test.raw", "tokenizer/params.json", "tokenizer/tokenizer.tiktoken",
                     "tokenizer/tokenizer_config.json"]
    kb = int(out.split("stage + repository ")[1].split()[0])
    assert sum(p.stat().st_size for p in path.rglob("*")) < kb * 1024 <= 20 * 2**20


def test_a_run_without_the_stage_stops_in_one_line(tmp_path):
    done = gpu_check(str(tmp_path / "results"), env={"GPU_CHECK_STAGE": str(tmp_path / "none"),
                                                      "GPU_CHECK_WORK": str(tmp_path / "work")})
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "--stage" in done.stderr, done.stderr
    assert not (tmp_path / "work").exists()


def test_limits_order_and_kill_grace():
    """At most 330 s in all; the checks that prove most before the timings; the FSDP step's kill grace outlasts
    torchrun's own grace for its workers (started in their own session, they outlive a killed agent)."""
    from torch.distributed.elastic.multiprocessing.api import PContext
    table = steps()
    names = [s[0] for s in table]
    assert sum(int(s[1]) for s in table) <= 330 and names[0] == "env"
    assert max(names.index(n) for n in ("tests", "sparse", "ast", "fsdp")) < min(names.index(n) for n in
                                                                                 ("kernels", "bench_ast"))
    torchrun_grace = inspect.signature(PContext.close).parameters["timeout"].default
    assert int(table[names.index("fsdp")][2]) > torchrun_grace


def test_rehearsal_leaves_a_row_per_step_and_every_log(rehearsal):
    base, done = rehearsal
    assert done.returncode == 0, done.stderr[-3000:]
    results = base / "results"
    assert sorted(p.name for p in results.iterdir()) == ["gpu_check.md", "gpu_check_logs.tar.gz"]
    table = steps()
    got = rows(results / "gpu_check.md")
    assert len(got) == len(table) == 12
    printed = [line for line in done.stdout.splitlines() if line.startswith("gpu_check: ")]
    assert [line.split(":")[1].strip() for line in printed[:-1]] == [s[0] for s in table]  # one status line each
    for name, _, _, needs, title in table:
        assert got[title] == "skipped: needs CUDA" if needs == "cuda" else got[title].startswith("ok"), (name, got)
    assert "the resumed run equals the uninterrupted one" in got[table[5][4]]
    with tarfile.open(results / "gpu_check_logs.tar.gz") as tar:
        logs = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    md = (results / "gpu_check.md").read_text()
    for name, _, _, needs, _ in table:
        if needs == "cuda":
            continue
        lines = [line for line in logs[f"{name}.log"].replace("\r", "\n").splitlines() if line.strip()]
        assert lines[-1] in md, name  # the log's tail in the results file, unfiltered


def sdpa_rows(ckpt, *flags):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "sdpa", "--ckpt", str(ckpt), "--device", "cpu",
                           *flags], cwd=ROOT, capture_output=True, text=True)
    return done.returncode, [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and
                             not line.startswith("| attention")], done.stdout


def test_sdpa_names_the_aten_op_and_measures_one_forward(tiny_ckpt):
    """Each path's profiled region holds one forward: 2 SDPA calls for 2 layers (the decode row would count 4 with
    the prompt's prefill inside); on CPU the fused op is the CPU flash kernel. Math in prefill fails the step."""
    rc, rows_, out = sdpa_rows(tiny_ckpt)
    assert rc == 0 and len(rows_) == 4, out
    assert all(r[1] == "2" and r[2] == "flash (CPU) x2" for r in rows_), out
    rc, rows_, out = sdpa_rows(tiny_ckpt, "--allow", "math")
    assert rc == 1 and rows_[0][2] == "math x2 (FAIL: prefill fell back to math)", out
    assert all(r[2] == "math x2" for r in rows_[1:]), out
    assert out.rstrip().endswith("result: FAIL: see the rows marked FAIL")


def test_memory_formula_is_the_readmes(tmp_path):
    """The formula the memory step prints, at the README's 7B recipe (8 GPUs, 2 x 4096 tokens, 8 micro-batches),
    gives the README's items (GB there, GiB here)."""
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "memory", "--shape", "llama2-7b", "--world-size", "8",
                           "--batch-size", "2", "--seq-len", "4096", "--grad-accum", "8", "--formula-only"],
                          cwd=ROOT, capture_output=True, text=True)
    gib = [float(line.rsplit(" | ", 1)[1].strip(" |*")) for line in done.stdout.splitlines()
           if line.startswith("| ") and not line.startswith("| item")][:-1]
    readme_gb = [13.5, 27.0, 1.7, 6.5 + 0.8, 2.1, None, 1.2, None, None, None]  # None: "~" or "<" in the README
    for got, want in zip(gib, readme_gb):
        if want is not None:
            assert abs(got * 2**30 / 1e9 - want) < 0.06, (got, want)


def test_a_killed_run_has_written_its_first_rows(stage, tmp_path):
    """Killed after its second step, a run has written both rows, their logs' tails and the archive. PYTHONPATH is
    prepended to (the env row shows it): a carried wheel's folder stays on it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_STAGE": str(stage[0]), "GPU_CHECK_WORK": str(tmp_path / "w"),
           "GPU_CHECK_LIMIT_SCALE": SCALE, "PYTHONPATH": str(tmp_path / "wheels")}
    proc = subprocess.Popen(["bash", str(SCRIPT), "--rehearse", str(tmp_path / "results")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        status = [proc.stdout.readline() for _ in range(2)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run, as a cut-short call ends
        proc.wait()
    assert [line.split(":")[1].strip() for line in status] == ["env", "stage"], status
    got = rows(tmp_path / "results" / "gpu_check.md")
    table = steps()
    assert got[table[0][4]].startswith("ok") and got[table[1][4]].startswith("ok")
    assert all(got[s[4]] == "not run yet" for s in table[3:])
    md = (tmp_path / "results" / "gpu_check.md").read_text()
    assert f"| PYTHONPATH | {ROOT}:{tmp_path / 'wheels'} |" in md
    with tarfile.open(tmp_path / "results" / "gpu_check_logs.tar.gz") as tar:
        assert {"env.log", "stage.log"} <= {Path(n).name for n in tar.getnames()}


def test_the_fsdp_step_fails_on_a_crash(stage, tmp_path):
    """A worker killed by a signal it does not handle exits non-zero too: not the stop the step checks for. A subset
    on a fresh machine (no model in the work folder yet) runs the stage step too."""
    env = {"GPU_CHECK_STAGE": str(stage[0]), "GPU_CHECK_WORK": str(tmp_path / "w"), "GPU_CHECK_LIMIT_SCALE": SCALE,
           "GPU_CHECK_STEPS": "fsdp", "GPU_CHECK_STOP_SIGNAL": "SIGUSR1"}
    done = gpu_check("--rehearse", str(tmp_path / "results"), env=env, timeout=600)
    got = rows(tmp_path / "results" / "gpu_check.md")
    table = {s[0]: s[4] for s in steps()}
    assert got[table["fsdp"]].startswith("FAIL (exit 1): FAIL: exit ") and "a crash, not the stop" in got[table["fsdp"]]
    assert got[table["env"]] == got[table["pat"]] == "not selected (GPU_CHECK_STEPS)", done.stdout
    assert got[table["stage"]].startswith("ok")
    assert "bench/gpu_check.py FAILED\n" in (tmp_path / "results" / "gpu_check.md").read_text()  # torchrun's, no colon


def test_every_flag_the_gpu_check_uses_exists(tmp_path, monkeypatch):
    """CI has no GPU to run the check: GPU_CHECK_DRY_RUN records every command the GPU run would start, and each
    one's flags are parsed here (parse_config with the values, as the scripts would; the bench/ helpers' argparse
    flags and subcommands read from their source)."""
    import train_ast
    import train_pat
    from cli import parse_config
    from kernels24 import bench
    stage = tmp_path / "stage"
    (stage / "data" / "wikitext-2-raw").mkdir(parents=True)
    (stage / "data" / "wikitext-2-raw" / "wiki.test.raw").write_text("")
    (stage / "COMMIT").write_text("abc\n")
    record = tmp_path / "commands"
    gpu_check(str(tmp_path / "results"), env={"GPU_CHECK_STAGE": str(stage), "GPU_CHECK_WORK": str(tmp_path / "w"),
                                              "GPU_CHECK_DRY_RUN": str(record)})
    configs = {"train_ast.py": train_ast.ASTArgs, "train_pat.py": train_pat.PATArgs, "kernels24.bench": bench.BenchConfig}
    helpers = ("bench/gpu_check.py", "bench/bench_ast.py")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is checked against the GPU
    seen = []
    for line in record.read_text().splitlines():
        argv = shlex.split(line)
        for i, token in enumerate(argv):
            if token in configs:
                parse_config(configs[token], argv[i + 1:])  # an unknown flag or a bad value: SystemExit or UserError
                seen.append(token)
                break
            if token in helpers:
                tree = ast.parse((ROOT / token).read_text())
                calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
                flags = {a.value for c in calls if c.func.attr == "add_argument" for a in c.args
                         if isinstance(a, ast.Constant)}
                subcommands = {c.args[0].value for c in calls if c.func.attr == "add_parser"}
                rest = argv[i + 1:]
                if subcommands:
                    assert rest[0] in subcommands, argv
                if rest[:1] != ["stop-after"]:  # stop-after passes the trainer's flags on (checked as its own)
                    assert {t.split("=")[0] for t in rest if t.startswith("--")} <= flags, argv
                    seen.append(token)
                    break
            if token == "pytest":
                seen.append(token)
    assert set(seen) == {*configs, *helpers, "pytest"} and seen.count("train_ast.py") == 3, seen  # ast, fsdp calm and stopped (the dry run stops there)
