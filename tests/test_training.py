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
    with pytest.raises(UserError, match="loss is nan at step 7; last good checkpoint: out/x/state.pt"):
        training.check_finite(torch.tensor(math.nan), 7, "out/x/state.pt")
    training.check_finite(torch.tensor(1.0), 7, None)


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
