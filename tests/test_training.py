"""Shared training machinery: schedule, flags, atomic checkpoints, exact data resume; FSDP/DDP helpers."""
import json
import math

import numpy as np
import pytest
import torch

import training
from cli import Progress, UserError
from training import TrainArgs, lr_at


def test_lr_schedule_warmup_then_cosine_to_min():
    args = TrainArgs(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lrs = [lr_at(s, args) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[60] == pytest.approx(0.55e-3)  # halfway through the cosine: (max + min) / 2
    assert lrs[110] == pytest.approx(1e-4)  # ends at min_lr_ratio * lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lr_at(500, args) == pytest.approx(1e-4)  # past the end: stays at the floor


def test_save_state_is_atomic_and_loads_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    training.save_state(path, {"step": 1, "w": torch.ones(3)})
    # a crash in the middle of the next save leaves the previous file intact and no temp file behind
    def crash(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        training.save_state(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = training.load_state(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["state.pt"]


def test_rng_state_round_trip(tmp_path):
    training.save_state(tmp_path / "s.pt", {"rng": training.rng_state()})
    a = (np.random.rand(), torch.rand(2), __import__("random").random())
    training.set_rng_state(training.load_state(tmp_path / "s.pt")["rng"])
    b = (np.random.rand(), torch.rand(2), __import__("random").random())
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_log_plot_progress_and_nan_stop(tmp_path):
    log = training.JsonlLog(tmp_path / "log.jsonl")
    for step in (10, 20, 20):  # a resumed run may log a step twice; the last one wins in the plot
        log.log({"step": step, "loss": 1.0 / step})
    assert [json.loads(l)["step"] for l in open(tmp_path / "log.jsonl")] == [10, 20, 20]
    training.plot_log(tmp_path / "log.jsonl", tmp_path / "log.png", ["loss", "missing"])
    p = Progress("step", 100)
    line = p.line(10, tokens=1000, loss=2.5, kl=None, lr=1e-4)
    assert line.startswith("step 10/100 | loss 2.5 lr 0.0001 |") and "tok/s" in line and "ETA" in line
    with pytest.raises(UserError, match=r"loss is nan at step 7; last good checkpoint: out/x/state.pt \(lower --lr .*"
                                        "then --resume"):
        training.check_finite(torch.tensor(math.nan), 7, "out/x/state.pt")
    with pytest.raises(UserError, match="loss is inf at step 2, before any checkpoint, so there is nothing to resume: "
                                        "lower --lr or raise --warmup-steps and start again with --overwrite$"):
        training.check_finite(torch.tensor(math.inf), 2, None)
    training.check_finite(torch.tensor(1.0), 7, None)


def test_the_stop_line_continues_with_resume_never_with_overwrite(monkeypatch):
    """A run started with --overwrite and stopped by a signal: the command it prints must not pass both flags."""
    monkeypatch.setattr("sys.argv", ["train_ast.py", "--out", "o", "--overwrite", "--max-steps", "9"])
    stop = training.StopRequest()
    stop.name, stop.previous = "SIGTERM", {}
    with pytest.raises(UserError, match=r"continue with: python train_ast.py --out o --max-steps 9 --resume$"):
        stop.stop(3, TrainArgs(out="o"))


def test_a_resumed_log_drops_a_torn_last_record_and_names_a_damaged_one(tmp_path):
    """A crash mid-write leaves half a record at the end: the resume's cut drops it (it was a JSONDecodeError)."""
    log = training.JsonlLog(tmp_path / "log.jsonl")
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "lo')
    log.keep_until(2)
    assert [json.loads(line)["step"] for line in open(log.path)] == [1, 2]
    log.path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(UserError, match=f"^{log.path}:2 is not a JSON record; delete that line and --resume again$"):
        log.keep_until(3)


def test_plot_log_skips_empty_series_and_draws_nothing_it_cannot(tmp_path, monkeypatch, capsys):
    """--no-eval logs ppl: null, a lost log axis has no positive value: such a series gets no panel (matplotlib
    raised on the log axis); with nothing at all to draw there is no plot and one line says so."""
    import matplotlib.pyplot as plt
    log = training.JsonlLog(tmp_path / "log.jsonl")
    log.log({"step": 0, "ppl": None, "dense_ppl": None})
    for step in (1, 2):
        log.log({"step": step, "loss": 2.0 / step, "tau": 0.0, "ce": float("nan")})
    log.log({"step": 2, "ppl": None, "ppl_merged": None})
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    training.plot_log(log.path, tmp_path / "log.png", ["loss", "ppl", "tau", "ce"], log_keys=("ppl", "tau"),
                      refs={"ppl": {"dense": None, "merged": float("nan")}})
    assert [ax.get_ylabel() for ax in figures[0].axes] == ["loss"] and (tmp_path / "log.png").stat().st_size > 0
    training.plot_log(log.path, tmp_path / "none.png", ["ppl", "tau"], log_keys=("ppl", "tau"))
    assert not (tmp_path / "none.png").exists() and "no plot" in capsys.readouterr().out


def test_a_full_disk_keeps_the_last_checkpoint_and_every_earlier_log_record(tmp_path, monkeypatch, full_disk):
    torch_save_short_write = full_disk.torch_save
    path = tmp_path / "state.pt"
    monkeypatch.setattr(torch, "save", torch_save_short_write)
    with pytest.raises(UserError, match="^the disk is full: could not write .*state.pt .*: the checkpoint of step 3 "
                                        "was not saved; no checkpoint was written yet: free some space and start again$"):
        training.save_state(path, {"step": 3})
    monkeypatch.undo()
    training.save_state(path, {"step": 3})
    monkeypatch.setattr(torch, "save", torch_save_short_write)
    with pytest.raises(UserError, match=f"step 6 was not saved; {path} still holds the last good checkpoint: free some "
                                        "space, then continue with --resume$"):
        training.save_state(path, {"step": 6})
    assert training.load_state(path)["step"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    log = training.JsonlLog(tmp_path / "log.jsonl")
    log.log({"step": 1, "loss": 2.0})
    import builtins
    real_open = builtins.open

    class HalfWrite:  # writes half of what it is given, then the disk is full
        def __init__(self, f):
            self.f = f
        def write(self, b):
            if len(b) > 4:
                return self.f.write(b[: len(b) // 2])
            raise OSError(28, "No space left on device")
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(builtins, "open", lambda p, mode="r", *a, **k: HalfWrite(real_open(p, mode, *a, **k))
                        if "a" in mode else real_open(p, mode, *a, **k))
    with pytest.raises(UserError, match=f"could not append to {log.path} .*; {path} still holds the last good"):
        log.log({"step": 2, "loss": 1.0})
    monkeypatch.undo()
    assert [json.loads(line) for line in open(log.path)] == [{"step": 1, "loss": 2.0}]  # no half record


def test_plot_log_axis_reference_lines_and_points_only_where_logged(tmp_path, monkeypatch):
    """Perplexity on a log axis with the dense / one-shot lines, a marked milestone, and a value drawn only at
    the steps that logged it (flip rates at mask updates, not carried between them)."""
    import matplotlib.pyplot as plt
    log = training.JsonlLog(tmp_path / "log.jsonl")
    log.log({"step": 0, "ppl": 2420.0})
    for step in range(1, 31):
        log.log({"step": step, "loss": 1.0 / step, **({"flip_prev": 0.01 / step} if step % 10 == 0 else {}),
                 **({"ppl": 300.0} if step == 30 else {})})
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    training.plot_log(tmp_path / "log.jsonl", tmp_path / "log.png", ["loss", "ppl", "flip_prev"],
                      refs={"ppl": {"dense": 52.7, "one-shot": 2420.0}}, marks={"milestone": 12})
    loss_ax, ppl_ax, flip_ax = figures[0].axes
    assert ppl_ax.get_yscale() == "log" and loss_ax.get_yscale() == "linear"
    horizontal = [line.get_ydata()[0] for line in ppl_ax.lines if len(set(line.get_ydata())) == 1
                  and len(line.get_xdata()) == 2 and line.get_xdata()[0] == 0 and line.get_xdata()[1] == 1]
    assert sorted(horizontal) == [52.7, 2420.0]
    assert all(any(list(line.get_xdata()) == [12, 12] for line in ax.lines) for ax in figures[0].axes)
    assert list(flip_ax.lines[0].get_xdata()) == [10, 20, 30]
    assert (tmp_path / "log.png").stat().st_size > 0


# ----------------------------------------------------------------------------- GPU readiness (issue 13)

def test_grad_sync_and_decay_groups_and_packed_bits():
    """grad_sync: FSDP2's flag per micro-batch, DDP's no_sync() only when not syncing; decay_groups: 2-D weights
    only, minus `skip`; pack_bits: eight mask entries per byte, any width, back exactly."""
    calls = []

    class FSDPLike:
        def set_requires_gradient_sync(self, enabled):
            calls.append(enabled)

    class DDPLike:
        def no_sync(self):
            calls.append("no_sync")
            return torch.no_grad()
    for enabled in (False, True):
        with training.grad_sync(FSDPLike(), enabled):
            pass
        with training.grad_sync(DDPLike(), enabled):
            pass
        with training.grad_sync(torch.nn.Linear(2, 2), enabled):  # one process: nothing to reduce
            pass
    assert calls == [False, "no_sync", True]
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    model.extra_s = torch.nn.Parameter(torch.ones(2, 2))
    decay, rest = training.decay_groups(model, 0.1, skip=("extra",))
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(5, 4), (4, 4)]
    assert len(rest["params"]) == 4  # LayerNorm weight and bias, the Linear's bias, extra_s
    for width in (8, 12, 576):
        mask = torch.rand(3, width) > 0.5
        packed = training.pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.shape == (3, -(-width // 8))
        assert torch.equal(training.unpack_bits(packed, width), mask)
