"""train_ast.py: the AST method on tiny models (CPU, seconds), resume, DDP equivalence, and a behaviour test."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_ast
import training
from model import ModelArgs, Transformer
from sparsity import check_nm, nm_mask, prunable_linears
from cli import autocast
from train_ast import ARSAdamW, ASTArgs, SparseLinear, slorb_init, sparsify, train_step, update_masks
from data import TokenBatches

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def tiny(seed=0, vocab=258, dim=64, hidden=128, n_layers=2):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                                 hidden_dim=hidden, max_seq_len=256))


def magnitude_masks(model):
    return {n: nm_mask(l.weight.detach().abs(), 2, 4) for n, l in prunable_linears(model).items()}


def byte_tokenizer():
    from tokenizer import TiktokenTokenizer
    return TiktokenTokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256, "</s>": 257}, r"\S+|\s+",
                             bos_id=256, eos_id=257, add_bos=False, specials_in_text=False, name="bytes")


# ----------------------------------------------------------------------------- the method, piece by piece

def test_masks_stay_bool_and_2_4_after_every_update():
    student = tiny()
    teacher = tiny()
    layers = sparsify(student, magnitude_masks(student))
    assert len(layers) == 2 * 7
    init = {n: l.mask.clone() for n, l in layers.items()}
    args = ASTArgs(lr=3e-2, warmup_steps=1, max_steps=6, batch_size=2, seq_len=16, decay_max=1e-2)
    opt = ARSAdamW(student.parameters(), {l.weight: l.mask for l in layers.values()}, lr=args.lr)
    batches = TokenBatches(np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint32), 16, 2, seed=0)
    flips = []
    for step in range(6):
        train_step(student, teacher, opt, batches, step, args, "cpu", torch.float32)
        flips.append(update_masks(layers, init))  # every step
        for layer in layers.values():
            assert layer.mask.dtype == torch.bool
            assert bool((layer.mask.reshape(-1, 4).sum(-1) == 2).all())
            assert check_nm(layer.weight * layer.mask, 2, 4)
    assert flips[-1][1] > 0  # with lr 3e-2 some masks really moved, and the rate counts them
    assert all(0 <= a <= 1 and 0 <= b <= 1 for a, b in flips)


@pytest.mark.parametrize("form", ["adamw", "grad"])
def test_decay_shrinks_pruned_weights_and_leaves_kept_alone(form):
    # regression test for the official GPT-2 code, whose `~mask` on an int tensor pushed weights away from 0
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 16).sign() * (0.1 + torch.rand(8, 16)))  # |w| >= 0.1 > 3 steps of lr
    mask = nm_mask(w.detach().abs(), 2, 4)
    before = w.detach().clone()
    opt = ARSAdamW([w], {w: mask}, lr=1e-2, form=form)
    opt.param_groups[0]["mask_decay"] = 0.5
    for _ in range(3):
        w.grad = torch.zeros_like(w)  # no task gradient: only the decay acts
        opt.step()
    after = w.detach()
    assert torch.equal(after[mask], before[mask])  # kept weights untouched
    assert bool((after[~mask].abs() < before[~mask].abs()).all())  # pruned weights pulled toward zero ...
    assert bool((after[~mask].sign() == before[~mask].sign()).all())  # ... without overshooting


@pytest.mark.parametrize("form", ["adamw", "grad"])
def test_optimizer_is_adamw_where_it_should_be(form):
    """Unmasked parameters always take AdamW's step; masked ones too in the gradient form with λ = 0."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 16))
    b = torch.nn.Parameter(a.detach().clone())
    masks = {a: nm_mask(a.detach().abs(), 2, 4)} if form == "grad" else {}
    ours = ARSAdamW([a], masks, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, form=form)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(8, 16)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_paper_form_follows_the_papers_equations():
    """m from g alone; u = m + λ¬M⊙W feeds the step and the second moment (ast.md §4, official adamw.py)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 8))
    mask = nm_mask(w.detach().abs(), 2, 4)
    lr, (b1, b2), eps, wd, lams = 1e-3, (0.9, 0.95), 1e-8, 0.1, [0.1, 0.2, 0.3]
    opt = ARSAdamW([w], {w: mask}, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, form="adamw")
    ref, m, v = w.detach().clone(), torch.zeros(4, 8), torch.zeros(4, 8)
    for t, lam in enumerate(lams, 1):
        g = torch.randn(4, 8)
        decay = lam * ref * ~mask
        m = b1 * m + (1 - b1) * g
        u = m + decay
        v = b2 * v + (1 - b2) * u ** 2
        ref = ref * (1 - lr * wd) - lr / (1 - b1 ** t) * u / ((v / (1 - b2 ** t)).sqrt() + eps)
        opt.param_groups[0]["mask_decay"] = lam
        w.grad = g
        opt.step()
        torch.testing.assert_close(opt.state[w]["exp_avg"], m)  # no decay in the first moment
    torch.testing.assert_close(w.detach(), ref)


def test_ste_forward_is_masked_and_backward_reaches_pruned_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False)
    mask = nm_mask(linear.weight.detach().abs(), 2, 4)
    layer = SparseLinear(linear, mask)
    x = torch.randn(3, 16)
    y = layer(x)
    assert torch.equal(y, F.linear(x, linear.weight.detach() * mask))  # exact W ⊙ M forward
    g_out = torch.randn_like(y)
    y.backward(g_out)
    torch.testing.assert_close(layer.weight.grad, g_out.T @ x)  # dense gradient, pruned entries included
    assert bool((layer.weight.grad[~mask] != 0).all())


def reference_ste(x, weight, mask):
    """The STE as first written: W ⊙ M as W minus its pruned part held constant (fp32 copies, a cast copy saved)."""
    return F.linear(x, weight - (weight * ~mask).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ste_function_equals_its_first_form_and_saves_no_weight_copy(dtype):
    """MaskedLinear, under fp32 and bf16 autocast: the same output and gradients as reference_ste, and of the
    weight's shape autograd keeps only W itself and the bool mask for backward."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8, bias=False)
    mask = nm_mask(linear.weight.detach().abs(), 2, 4)
    layer = SparseLinear(linear, mask)
    w_ref = linear.weight.detach().clone().requires_grad_()
    x = torch.randn(2, 5, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    saved = {"ours": [], "reference": []}

    def forward(which, f, *args):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved[which].append(t) or t, lambda t: t):
            with autocast(dtype, "cpu"):
                return f(*args)
    y, y_ref = forward("ours", layer, x), forward("reference", reference_ste, x_ref, w_ref, mask)
    g = torch.randn(y.shape).to(y.dtype)
    y.backward(g)
    y_ref.backward(g)
    assert y.dtype == y_ref.dtype == dtype and torch.equal(y, y_ref)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(layer.weight.grad, w_ref.grad)

    def copies(tensors, weight):  # saved tensors of the weight's shape (or its transpose) but W itself or the mask
        return [t for t in tensors if sorted(t.shape) == sorted(weight.shape) and t.dtype != torch.bool
                and t.data_ptr() != weight.data_ptr()]
    assert copies(saved["ours"], linear.weight) == []
    assert len(copies(saved["reference"], w_ref)) == 1  # the first form keeps one (fp32, or autocast's bf16 cast)


def test_slorb_init_keeps_each_groups_weight_sum():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 6, bias=False)
    w = linear.weight.detach().clone()
    mask = nm_mask(w.abs(), 2, 4)
    x_mat, s_mat = slorb_init(w, mask, 16)
    assert x_mat.shape == (2, 32) and s_mat.shape == (6, 2)
    assert torch.equal(x_mat.sum(0), torch.ones(32)) and torch.equal(x_mat[1, 16:], torch.ones(16))
    effective = w * mask + s_mat @ x_mat
    torch.testing.assert_close(effective.view(6, 2, 16).sum(-1), w.view(6, 2, 16).sum(-1))
    layer = SparseLinear(linear, mask, slorb_k=16)
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), F.linear(x, effective))
    assert layer.slorb_x.requires_grad and layer.slorb_s.requires_grad  # X trainable, as in the official runs


# ----------------------------------------------------------------------------- the script end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny checkpoint with a byte tokenizer and a small data dir (text/ + wikitext-2-raw/)."""
    import checkpoint
    if not SHARED.exists():
        pytest.skip("needs ../shared/data")
    root = tmp_path_factory.mktemp("ast")
    model = tiny(seed=1)
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
    for k in a:  # the same update up to float summation order (gradients are averaged across ranks)
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_nan_loss_stops_with_the_last_checkpoint(tiny_run, monkeypatch):
    from cli import UserError
    monkeypatch.chdir(tiny_run)
    # a NaN learning rate (the flag refuses one): step 1 computes a finite loss and writes NaN weights,
    # so step 2's loss is NaN
    monkeypatch.setattr(training, "lr_at", lambda step, args: float("nan"))
    with pytest.raises(UserError, match="loss is nan at step 2; last good checkpoint: none yet"):
        train_ast.main(run_args(tiny_run, tiny_run / "nan", "--ckpt-interval", "0"))


# ----------------------------------------------------------------------------- behaviour on a trained model

def _byte_windows(ids, n, seq):
    return torch.from_numpy(ids[: n * seq].astype(np.int64)).view(n, seq)


@torch.no_grad()
def _ppl(model, windows):
    logits = model(windows)
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item())


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_ast_recovers_a_really_trained_model_and_beats_fixed_mask_without_distillation():
    """Train a tiny dense byte-level Llama on tinyshakespeare, prune it 2:4 by magnitude, then retrain for the
    same number of steps with AST (adaptive masks + decay + distillation) and with a fixed mask on CE alone."""
    import copy
    raw = np.frombuffer((SHARED / "text" / "tinyshakespeare.txt").read_bytes(), dtype=np.uint8).astype(np.uint32)
    train_ids, val = raw[:-100_000], _byte_windows(raw[-100_000:], 64, 64)
    dense = tiny(seed=0, vocab=256, dim=64, hidden=192)
    opt = torch.optim.AdamW(dense.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    batches = TokenBatches(train_ids, 64, 16, seed=0)
    for step in range(300):  # a real (small) pretraining run: warmup + cosine, ~ppl 8 on held-out bytes
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / 300)))
        x, y = batches.next()
        F.cross_entropy(dense(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()
    dense.requires_grad_(False)

    def retrain(alpha, mask_interval, decay_max, steps=60):
        student = copy.deepcopy(dense).requires_grad_(True)
        layers = sparsify(student, magnitude_masks(student))
        init = {n: l.mask.clone() for n, l in layers.items()}
        args = ASTArgs(lr=1e-3, warmup_steps=5, max_steps=steps, batch_size=16, seq_len=64, alpha=alpha,
                       decay_max=decay_max, decay_warmup=steps // 4)
        opt = ARSAdamW(student.parameters(), {l.weight: l.mask for l in layers.values()}, lr=args.lr)
        batches = TokenBatches(train_ids, 64, 16, seed=1)
        oneshot = _ppl(student, val)
        for step in range(steps):
            train_step(student, dense if alpha else None, opt, batches, step, args, "cpu", torch.float32)
            if mask_interval and (step + 1) % mask_interval == 0:
                update_masks(layers, init)
        for name, layer in layers.items():
            assert check_nm(layer.weight * layer.mask, 2, 4)
        return oneshot, _ppl(student, val)

    dense_ppl = _ppl(dense, val)
    oneshot, fixed = retrain(alpha=0.0, mask_interval=0, decay_max=0.0)
    _, ast = retrain(alpha=0.67, mask_interval=10, decay_max=0.3)  # λ scaled to this tiny model's weights
    print(f"dense {dense_ppl:.3f} one-shot 2:4 {oneshot:.3f} fixed-mask CE {fixed:.3f} AST {ast:.3f}")
    assert oneshot > dense_ppl * 1.1  # pruning really hurts
    assert (oneshot - ast) / (oneshot - dense_ppl) > 0.8  # AST recovers most of what pruning lost
    assert ast < fixed  # and beats fixed-mask training without distillation at equal steps


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
    initial = magnitude_masks(dense)
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
