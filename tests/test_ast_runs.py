"""train_ast.py end to end on a tiny checkpoint: resume after a kill or a signal, DDP and FSDP under torchrun,
NaN stop, overwrite refusal, fixed masks, --init-mask, and the last step (issues 13 and 16)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_ast
import training
from model import ModelArgs, Transformer
from sparsity import check_nm, prunable_linears
from train_ast import sparsify

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def byte_tokenizer():
    from tokenizer import TiktokenTokenizer
    return TiktokenTokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256, "</s>": 257}, r"\S+|\s+",
                             bos_id=256, eos_id=257, add_bos=False, specials_in_text=False, name="bytes")


# ----------------------------------------------------------------------------- the script end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny checkpoint with a byte tokenizer and a small data dir (text/ + wikitext-2-raw/)."""
    import checkpoint
    if not SHARED.exists():
        pytest.skip("needs ../shared/data")
    root = tmp_path_factory.mktemp("ast")
    torch.manual_seed(1)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, hidden_dim=128,
                                  max_seq_len=256))
    checkpoint.save(model, byte_tokenizer(), root / "tiny")
    data = root / "data"
    (data / "text").mkdir(parents=True)
    (data / "wikitext-2-raw").mkdir()
    shakespeare = (SHARED / "text" / "tinyshakespeare.txt").read_text()
    (data / "text" / "tinyshakespeare.txt").write_text(shakespeare[:60_000])
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(shakespeare[-20_000:])
    return root


def run_args(root, out, *extra):
    return ["--ckpt", str(root / "tiny"), "--data-dir", str(root / "data"), "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--max-steps", "6", "--warmup-steps", "2", "--lr", "1e-2", "--mask-interval", "2",
            "--decay-max", "1e-2", "--ppl-windows", "4", "--ppl-seq-len", "32", "--eval-interval", "0", "--log-interval", "100",
            "--decay-warmup", "3", *extra]


def weights(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "final" / "model.safetensors"))


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_resume_after_a_kill_is_bit_identical(tiny_run, monkeypatch, capsys):
    monkeypatch.chdir(tiny_run)
    train_ast.main(run_args(tiny_run, tiny_run / "straight", "--ckpt-interval", "3", "--slorb-k", "16"))
    real_check = train_ast.check_finite

    def killed_at_step_5(loss, step, last_ckpt):
        if step == 5:
            raise KeyboardInterrupt  # the process dies after the step-3 checkpoint, mid step 5
        real_check(loss, step, last_ckpt)
    monkeypatch.setattr(train_ast, "check_finite", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_ast.main(run_args(tiny_run, tiny_run / "killed", "--ckpt-interval", "3", "--slorb-k", "16"))
    monkeypatch.setattr(train_ast, "check_finite", real_check)
    train_ast.main(run_args(tiny_run, tiny_run / "killed", "--ckpt-interval", "3", "--slorb-k", "16", "--resume"))
    a, b = weights(tiny_run / "straight"), weights(tiny_run / "killed")
    assert a.keys() == b.keys() and any("slorb_s" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log, flip rates included, record for record: nothing spliced, no counter restarted at 0
    log = (tiny_run / "straight" / "log.jsonl").read_text()
    assert (tiny_run / "killed" / "log.jsonl").read_text() == log and '"flip_prev"' in log
    # the export: exact 2:4 zeros, loadable by model.load with its SLoRB branches
    from checkpoint import load_masks
    from checkpoint import load
    model, _ = load(tiny_run / "killed" / "final")
    masks = load_masks(tiny_run / "killed" / "final")
    for name, lin in prunable_linears(model).items():
        assert check_nm(lin.weight, 2, 4) and bool((lin.weight[~masks[name]] == 0).all())
        assert lin.slorb_s.abs().sum() > 0


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_torchrun_two_processes_equal_one_with_the_same_global_batch(tiny_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, str(ROOT / "train_ast.py"),
                          *run_args(tiny_run, tiny_run / "one", "--batch-size", "4", "--device", "cpu")],
                         cwd=tiny_run, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", str(ROOT / "train_ast.py"),
                          *run_args(tiny_run, tiny_run / "two", "--batch-size", "2", "--device", "cpu")],
                         cwd=tiny_run, env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es)" in two.stdout
    from checkpoint import load_masks
    ma, mb = load_masks(tiny_run / "one" / "final"), load_masks(tiny_run / "two" / "final")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)  # the same mask updates
    a, b = weights(tiny_run / "one"), weights(tiny_run / "two")
    for k in a:  # the same update up to float summation order (gradients are averaged across ranks); Adam turns a
        # summation-order difference in a near-zero gradient into up to lr (1e-2) per step: atol is 1% of one step
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_nan_loss_stops_with_the_last_checkpoint(tiny_run, monkeypatch):
    from cli import UserError
    monkeypatch.chdir(tiny_run)
    # a NaN learning rate (the flag refuses one): step 1 computes a finite loss and writes NaN weights,
    # so step 2's loss is NaN
    monkeypatch.setattr(training, "lr_at", lambda step, args: float("nan"))
    with pytest.raises(UserError, match="loss is nan at step 2, before any checkpoint, so there is nothing to resume: "
                                        ".* start again with --overwrite"):
        train_ast.main(run_args(tiny_run, tiny_run / "nan", "--ckpt-interval", "0"))


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(tiny_run, monkeypatch, capsys):
    """What a scheduler sends before preemption: the run saves at the end of that step, exits with one line
    naming --resume, and the resumed run ends equal to an uninterrupted one, log included."""
    monkeypatch.chdir(tiny_run)
    train_ast.main(run_args(tiny_run, tiny_run / "calm", "--ckpt-interval", "0"))
    real_step = train_ast.train_step

    def signalled_in_step_3(*args, **kwargs):
        parts = real_step(*args, **kwargs)
        if args[4] == 2:  # step index 2 = the third step
            os.kill(os.getpid(), signal.SIGTERM)
        return parts
    monkeypatch.setattr(train_ast, "train_step", signalled_in_step_3)
    from cli import UserError
    with pytest.raises(UserError, match=r"stopped by SIGTERM after step 3; .*state.pt holds it; continue with: .*--resume"):
        train_ast.main(run_args(tiny_run, tiny_run / "preempted", "--ckpt-interval", "0"))
    assert training.load_state(tiny_run / "preempted" / "state.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(train_ast, "train_step", real_step)
    train_ast.main(run_args(tiny_run, tiny_run / "preempted", "--ckpt-interval", "0", "--resume"))
    a, b = weights(tiny_run / "calm"), weights(tiny_run / "preempted")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_run / "calm" / "log.jsonl").read_text() == (tiny_run / "preempted" / "log.jsonl").read_text()


def test_a_fresh_run_never_overwrites_a_run(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    out = tiny_run / "taken"
    train_ast.main(run_args(tiny_run, out, "--max-steps", "2", "--no-eval"))
    before = (out / "log.jsonl").read_text()
    from cli import UserError
    with pytest.raises(UserError, match="already holds .*--resume.*--overwrite"):
        train_ast.main(run_args(tiny_run, out, "--max-steps", "3", "--no-eval"))
    assert (out / "log.jsonl").read_text() == before
    train_ast.main(run_args(tiny_run, out, "--max-steps", "3", "--no-eval", "--overwrite"))
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [0, 1, 2, 3]  # the new run alone, nothing of the old one spliced in


def test_mask_interval_0_keeps_the_initial_mask(tiny_run, monkeypatch):
    """The paper's fixed-mask ablation: no mask update ever, so the exported masks are the initial magnitude ones
    (with --mask-interval 2 the same run changes them)."""
    from checkpoint import load, load_masks
    monkeypatch.chdir(tiny_run)
    dense, _ = load(tiny_run / "tiny", tokenizer=False)
    initial = train_ast.initial_masks(train_ast.ASTArgs(), dense)  # magnitude 2:4
    train_ast.main(run_args(tiny_run, tiny_run / "fixed", "--mask-interval", "0", "--no-eval"))
    fixed = load_masks(tiny_run / "fixed" / "final")
    assert all(torch.equal(fixed[k], initial[k]) for k in initial)
    assert '"flip_prev"' not in "".join(open(tiny_run / "fixed" / "log.jsonl").readlines()[1:])
    train_ast.main(run_args(tiny_run, tiny_run / "adaptive", "--no-eval"))
    adaptive = load_masks(tiny_run / "adaptive" / "final")
    assert any(not torch.equal(adaptive[k], initial[k]) for k in initial)


def test_init_mask_starts_from_the_one_shot_checkpoints_weights_and_masks(tiny_run, monkeypatch):
    """--init-mask out/sparsegpt24 starts at SparseGPT's perplexity (its reconstructed weights, not only its masks);
    the teacher, and the dense reference line, stay the dense --ckpt."""
    import checkpoint
    import sparsity
    from eval import WikiText2
    monkeypatch.chdir(tiny_run)
    model, tok = checkpoint.load(tiny_run / "tiny")
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    masks = sparsity.prune(model, "sparsegpt", "2:4", calib, log=lambda *a, **k: None)
    checkpoint.save(model, tok, tiny_run / "sparsegpt24", masks=masks)
    wikitext = WikiText2(tok, tiny_run / "data", 32, 4)
    dense, _ = checkpoint.load(tiny_run / "tiny", tokenizer=False)
    dense_ppl = wikitext(dense)
    sparsify(dense, masks)  # the old behaviour: dense weights under SparseGPT's masks
    train_ast.main(run_args(tiny_run, tiny_run / "from_sparsegpt", "--init-mask", str(tiny_run / "sparsegpt24"),
                            "--max-steps", "1"))
    first = json.loads(open(tiny_run / "from_sparsegpt" / "log.jsonl").readline())
    assert first["ppl"] == pytest.approx(wikitext(model), rel=1e-5)
    assert first["dense_ppl"] == pytest.approx(dense_ppl, rel=1e-5)
    masked_dense = wikitext(dense)
    assert abs(first["ppl"] - masked_dense) > 1e-3 * masked_dense


def test_no_mask_update_after_the_last_step(tiny_run, monkeypatch):
    """--max-steps 6 with --mask-interval 2: updates after steps 2 and 4, none after 6 (the export would carry
    flips no step ever trained)."""
    monkeypatch.chdir(tiny_run)
    train_ast.main(run_args(tiny_run, tiny_run / "last", "--no-eval"))
    records = [json.loads(line) for line in open(tiny_run / "last" / "log.jsonl")]
    assert [r["step"] for r in records if "flip_prev" in r and r["step"] > 0] == [2, 4]


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_torchrun_ranks_agree_on_the_step_when_one_is_signalled(tiny_run, tmp_path):
    """SIGTERM reaches rank 1 alone (in its third step); both ranks checkpoint after that step and stop, and the
    resumed two-process run ends equal to an uninterrupted one."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal, training\n"
        "real, calls = training.StopRequest.requested, []\n"
        "def requested(self, device):\n"
        "    calls.append(1)\n"
        "    if os.environ.get('RANK') == '1' and len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(self, device)\n"
        "training.StopRequest.requested = requested\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}

    def torchrun(out, *extra, port):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), str(ROOT / "train_ast.py"),
                               *run_args(tiny_run, out, "--batch-size", "2", "--device", "cpu", "--no-eval"), *extra],
                              cwd=tiny_run, env=env, capture_output=True, text=True, timeout=180)
    stopped = torchrun(tmp_path / "run", port=29531)
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 3" in stopped.stderr
    assert "stopped by a signal on another rank after step 3" in stopped.stderr
    assert training.load_state(tmp_path / "run" / "state.pt")["step"] == 3
    env["PYTHONPATH"] = str(ROOT)  # no more signals
    assert torchrun(tmp_path / "run", "--resume", port=29532).returncode == 0
    assert torchrun(tmp_path / "calm", port=29533).returncode == 0
    a, b = weights(tmp_path / "calm"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)

# ----------------------------------------------------------------------------- GPU readiness (issue 13): FSDP,
# optimizer state, weight decay, λ(t), and the distillation-only control

FSDP_KILL_HOOK = (  # sitecustomize for torchrun: rank 1 dies (SIGKILL) at the end of step 5, after the step-3 checkpoint
    "import os, signal, training\n"
    "real, calls = training.StopRequest.requested, []\n"
    "def requested(self, device):\n"
    "    calls.append(1)\n"
    "    if os.environ.get('RANK') == '1' and len(calls) == 5:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    return real(self, device)\n"
    "training.StopRequest.requested = requested\n")


@pytest.fixture(scope="module")
def fsdp_runs(tiny_run, tmp_path_factory):
    """Two-process gloo FSDP runs of 6 steps that evaluate at step 0, 3 and 6 and checkpoint at 3: one killed after
    step 5 then resumed, one uninterrupted; and the same run in one plain process. Returns their directories."""
    root = tmp_path_factory.mktemp("fsdp")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FSDP_KILL_HOOK)
    extra = ("--eval-interval", "3", "--ckpt-interval", "3", "--device", "cpu")

    def torchrun(out, *more, port, pythonpath=str(ROOT)):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), str(ROOT / "train_ast.py"),
                               *run_args(tiny_run, out, "--batch-size", "2", "--fsdp", *extra), *more],
                              cwd=tiny_run, env=env, capture_output=True, text=True, timeout=240)
    killed = torchrun(root / "killed", port=29541, pythonpath=f"{hook}{os.pathsep}{ROOT}")
    assert killed.returncode != 0 and (root / "killed" / "state.pt").exists(), killed.stderr[-3000:]
    state_at_kill = training.load_state(root / "killed" / "state.pt")
    resumed = torchrun(root / "killed", "--resume", port=29542)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    calm = torchrun(root / "calm", port=29543)
    assert calm.returncode == 0, calm.stderr[-3000:]
    train_ast.main(run_args(tiny_run, root / "one", *extra))  # one plain process, in this one
    return {"root": root, "state_at_kill": state_at_kill, "resumed_stdout": resumed.stdout}


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_fsdp_evaluates_resumes_after_a_kill_and_equals_the_uninterrupted_run_and_one_process(fsdp_runs):
    """Issue 13 (1, 2): evaluation under FSDP (step 0 and mid-run) and the next training step; a rank killed after
    the step-3 checkpoint; the resumed run equals the uninterrupted 2-process run exactly, and 1 process within
    fp32 summation-order tolerance (masks equal, weights and perplexities close)."""
    root = fsdp_runs["root"]
    assert fsdp_runs["state_at_kill"]["step"] == 3
    assert "resuming from" in fsdp_runs["resumed_stdout"]
    log = (root / "calm" / "log.jsonl").read_text()
    assert (root / "killed" / "log.jsonl").read_text() == log  # same world size: the same float operations
    calm, killed, one = (weights(root / name) for name in ("calm", "killed", "one"))
    assert all(torch.equal(calm[k], killed[k]) for k in calm)
    records = [json.loads(line) for line in log.splitlines()]
    assert [r["step"] for r in records] == list(range(7))
    assert [r["step"] for r in records if r.get("ppl") is not None] == [0, 3, 6]
    for r, s in zip(records, map(json.loads, open(root / "one" / "log.jsonl"))):  # losses, perplexities, flips
        assert r.keys() == s.keys() and r == pytest.approx(s, rel=1e-4, abs=1e-6), r["step"]
    from checkpoint import load_masks
    masks, masks_one = load_masks(root / "calm" / "final"), load_masks(root / "one" / "final")
    assert all(torch.equal(masks[k], masks_one[k]) for k in masks)
    for k in calm:  # 1 process: another summation order, grown by Adam's normalisation
        torch.testing.assert_close(one[k], calm[k], rtol=1e-3, atol=1e-4)  # as two processes vs one, above


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_fsdp_state_pt_holds_the_full_optimizer_state(fsdp_runs):
    """Issue 13 (2): the gathered optimizer state has each parameter's full shape (not rank 0's shard), and the
    moments of the two halves differ from each other (rank 1's half is not a copy of rank 0's)."""
    state = fsdp_runs["state_at_kill"]
    moments = state["optimizer"]["state"]
    assert set(moments) == set(state["model"])  # keyed by parameter name, every parameter
    for name, s in moments.items():
        assert s["exp_avg"].shape == s["exp_avg_sq"].shape == state["model"][name].shape, name
    m = moments["layers.0.attention.wq.weight"]["exp_avg"]
    assert not torch.equal(m[: len(m) // 2], m[len(m) // 2 :])


# ----------------------------------------------------------------------------- what a user types: exports, resume
# flags, a full disk, a second run

def names(out) -> list:
    """The files of a run directory, but the lock file of a run this process still holds (cli_main would release it)."""
    return sorted(p.name for p in Path(out).iterdir() if p.name != ".lock")


def files_of(out) -> dict:
    return {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file() and p.name != ".lock"}


def test_an_interrupted_export_leaves_no_final_and_resume_exports_it(tiny_run, monkeypatch, capsys):
    """Ctrl-C while final/ is written: no final/ at all (not a half one), and --resume exports it again rather than
    call the run finished; the export equals an uninterrupted run's."""
    import checkpoint
    monkeypatch.chdir(tiny_run)
    train_ast.main(run_args(tiny_run, tiny_run / "whole", "--no-eval"))
    real_export_hf = checkpoint.export_hf

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "export_hf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_ast.main(run_args(tiny_run, tiny_run / "cut", "--no-eval"))
    assert names(tiny_run / "cut") == ["log.jsonl", "state.pt"]
    monkeypatch.setattr(checkpoint, "export_hf", real_export_hf)
    capsys.readouterr()
    train_ast.main(run_args(tiny_run, tiny_run / "cut", "--no-eval", "--resume"))
    assert "final is missing (an interrupted export): exporting again" in capsys.readouterr().out
    a, b = weights(tiny_run / "whole"), weights(tiny_run / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a) and (tiny_run / "cut" / "final" / "hf").is_dir()
    assert names(tiny_run / "cut") == ["final", "log.jsonl", "log.png", "state.pt"]


def test_resume_with_a_changed_defining_flag_is_refused_on_a_real_run(tiny_run, monkeypatch):
    """train_ast stores its kind and flags in state.pt: --seq-len 64 and --ppl-seq-len 64 on a 32 run are named;
    --max-steps may change."""
    from cli import UserError
    monkeypatch.chdir(tiny_run)
    out = tiny_run / "flags"
    train_ast.main(run_args(tiny_run, out, "--max-steps", "2", "--ckpt-interval", "1", "--ppl-windows", "1"))
    before = files_of(out)
    with pytest.raises(UserError, match="was started with --seq-len 32, --ppl-seq-len 32, not --seq-len 64, "
                                        "--ppl-seq-len 64; these flags define the run"):
        train_ast.main(run_args(tiny_run, out, "--max-steps", "3", "--ppl-windows", "1", "--resume", "--seq-len", "64",
                                "--ppl-seq-len", "64"))
    assert files_of(out) == before
    train_ast.main(run_args(tiny_run, out, "--max-steps", "3", "--ppl-windows", "1", "--resume"))
    assert training.load_state(out / "state.pt")["step"] == 3


def test_a_full_disk_says_so_and_keeps_the_last_checkpoint_then_resumes(tiny_run, monkeypatch, full_disk):
    """The disk fills while step 6's checkpoint is written, then while final/ is written: one line each naming what
    was kept (state.pt of step 3, then of step 6), and --resume finishes the run equal to an undisturbed one."""
    import checkpoint
    from cli import UserError
    monkeypatch.chdir(tiny_run)
    train_ast.main(run_args(tiny_run, tiny_run / "roomy", "--no-eval", "--ckpt-interval", "3"))
    out, real_save = tiny_run / "full", torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: full_disk.torch_save(obj, f)
                        if isinstance(obj, dict) and obj.get("step") == 6 else real_save(obj, f, *a, **k))
    with pytest.raises(UserError, match=f"^the disk is full: could not write {out / 'state.pt'} .*: the checkpoint of "
                                        f"step 6 was not saved; {out / 'state.pt'} still holds the last good checkpoint"):
        train_ast.main(run_args(tiny_run, out, "--no-eval", "--ckpt-interval", "3"))
    assert training.load_state(out / "state.pt")["step"] == 3
    monkeypatch.setattr(torch, "save", real_save)
    real_save_file = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", lambda tensors, path, *a, **k: full_disk.safetensors(path))
    with pytest.raises(UserError, match=f"^the disk is full: could not write .*model.safetensors .*, exporting "
                                        f"{out / 'final'}; {out / 'state.pt'} keeps the trained model: free some space "
                                        "and run again with --resume to export it$"):
        train_ast.main(run_args(tiny_run, out, "--no-eval", "--ckpt-interval", "3", "--resume"))
    assert training.load_state(out / "state.pt")["step"] == 6
    assert names(out) == ["log.jsonl", "state.pt"]
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    train_ast.main(run_args(tiny_run, out, "--no-eval", "--ckpt-interval", "3", "--resume"))
    a, b = weights(tiny_run / "roomy"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "log.jsonl").read_text() == (tiny_run / "roomy" / "log.jsonl").read_text()


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_two_ranks_into_a_locked_out_stop_at_once_with_one_line_from_rank_0(tiny_run, tmp_path, another_run_locks):
    """Rank 0 alone takes the lock (a second rank taking it would find rank 0's and fail every run) and tells the
    others: with another run holding --out, both ranks exit 1 at once, rank 0 with the line naming that run's pid,
    rank 1 silent. Launched as a scheduler does (RANK, WORLD_SIZE in each process's environment, no torchrun agent
    to kill a rank left waiting at a barrier)."""
    out = tmp_path / "run"
    out.mkdir()
    pid = another_run_locks(out)
    ranks = [subprocess.Popen([sys.executable, str(ROOT / "train_ast.py"), *run_args(tiny_run, out, "--device", "cpu")],
                              cwd=tiny_run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": str(r),
                                   "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": "29571"}) for r in range(2)]
    try:
        said = [rank.communicate(timeout=90) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [1, 1]
    assert said[0][1] == f"error: --out {out} is in use by another run (pid {pid}); wait for it to end, or " \
                         f"choose another --out\n"
    assert said[1][1] == "" and said[1][0] == "" and said[0][0] == ""
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the holder's, left by its SIGKILL; nothing of ours
