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
    same number of steps with AST (adaptive masks + decay + distillation), a fixed mask on CE alone, a fixed mask
    with distillation (the control: distillation alone), and adaptive masks with distillation but no decay.
    What holds at this scale: distillation is the gain (AST and fixed + KD both beat fixed + CE and are within
    0.5% of each other; adaptive masks add nothing measurable here), and the annealed decay is what keeps
    adaptive masks from losing (without it the masks churn and perplexity is worse than any fixed mask)."""
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
            if mask_interval and (step + 1) % mask_interval == 0 and step + 1 < steps:  # as the trainer
                update_masks(layers, init)
        for name, layer in layers.items():
            assert check_nm(layer.weight * layer.mask, 2, 4)
        return oneshot, _ppl(student, val)

    dense_ppl = _ppl(dense, val)
    oneshot, fixed = retrain(alpha=0.0, mask_interval=0, decay_max=0.0)
    _, ast = retrain(alpha=0.67, mask_interval=10, decay_max=0.3)  # λ scaled to this tiny model's weights
    _, fixed_kd = retrain(alpha=0.67, mask_interval=0, decay_max=0.0)
    _, no_decay = retrain(alpha=0.67, mask_interval=10, decay_max=0.0)
    print(f"dense {dense_ppl:.3f} one-shot 2:4 {oneshot:.3f} fixed-mask CE {fixed:.3f} fixed-mask KD {fixed_kd:.3f} "
          f"AST {ast:.3f} adaptive KD without decay {no_decay:.3f}")
    assert oneshot > dense_ppl * 1.1  # pruning really hurts
    assert (oneshot - ast) / (oneshot - dense_ppl) > 0.8  # AST recovers most of what pruning lost
    assert ast < fixed and fixed_kd < fixed  # and beats fixed-mask training without distillation at equal steps ...
    assert abs(ast - fixed_kd) < 0.005 * fixed_kd  # ... as distillation alone does: no gain from adaptive masks here
    assert no_decay - ast > 0.1 * (oneshot - dense_ppl)  # the decay is what makes adaptive masks safe


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
        torch.testing.assert_close(one[k], calm[k], rtol=1e-3, atol=1e-5)


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


def test_decay_schedule_rises_linearly_to_lambda_max_at_t0_then_holds():
    """λ(t) = λ_max · min(t / T0, 1) for optimizer step t = step + 1 (ast.md §4): small at first, λ_max from T0 on."""
    args = ASTArgs(max_steps=40, decay_max=6e-5, decay_warmup=10)
    lams = [train_ast.decay_at(step, args) for step in range(40)]
    assert lams[0] == pytest.approx(6e-6)  # t = 1: λ_max / T0, not λ_max (a constant) nor 0
    assert [b - a for a, b in zip(lams[:9], lams[1:10])] == pytest.approx([6e-6] * 9)  # rising, linearly
    assert lams[9:] == pytest.approx([6e-5] * 31)  # λ_max from t = T0 on, never past it
    default = ASTArgs(max_steps=40, decay_max=1.0)  # T0 defaults to a quarter of the run
    assert [train_ast.decay_at(s, default) for s in (0, 8, 9, 39)] == pytest.approx([0.1, 0.9, 1.0, 1.0])


def test_weight_decay_only_on_the_models_weight_matrices():
    """--weight-decay reaches the projections, embeddings and LM head; never norm gains nor SLoRB's X and S."""
    student = tiny()
    layers = sparsify(student, magnitude_masks(student), slorb_k=16)
    opt = train_ast.make_optimizer(student, layers, ASTArgs(weight_decay=0.1, lr=0.5))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    for p in student.parameters():
        p.grad = torch.zeros_like(p)  # no gradient and λ = 0: only the decoupled weight decay can move a weight
    opt.step()
    decayed = set()
    for name, p in student.named_parameters():
        if not torch.equal(p.detach(), before[name]):
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.5 * 0.1))
            decayed.add(name)
    assert {"tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight"} <= decayed
    assert decayed == {n for n, p in student.named_parameters() if p.ndim == 2 and "slorb" not in n}
    assert not any("norm" in n or "slorb" in n for n in decayed)


def test_update_masks_stays_on_the_device_and_reads_the_host_once(monkeypatch):
    """No per-layer host copy or sync (the old code copied every mask to the CPU: 6.5 GB at 7B, and two devices met
    at the first update in bench_ast on CUDA); the flip counts are read once. Packed or bool initial masks agree."""
    student = tiny()
    layers = sparsify(student, magnitude_masks(student))
    previous = {n: l.mask.clone() for n, l in layers.items()}
    init = {n: training.pack_bits(l.mask) for n, l in layers.items()}
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.add_(torch.randn_like(layer.weight) * 0.05)  # some weights cross their group's threshold
    reads = []
    for method in ("cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _r=real, _m=method, **k: reads.append(_m) or _r(self, *a, **k))
    flips = update_masks(layers, init)
    monkeypatch.undo()
    assert reads == ["tolist"]
    changed = sum(int((l.mask != previous[n]).sum()) for n, l in layers.items())
    total = sum(l.mask.numel() for l in layers.values())
    assert changed > 0 and flips == pytest.approx((changed / total, changed / total))
    assert update_masks(layers, previous)[1] == pytest.approx(changed / total)  # bool initial masks: the same count


def test_gradients_are_reduced_on_the_last_micro_batch_only(monkeypatch):
    """--grad-accum 3: FSDP's set_requires_gradient_sync is False for micro-batches 1 and 2 and True for the last;
    DDP's no_sync() wraps the first two."""
    student, teacher = tiny(), tiny(seed=1)
    layers = sparsify(student, magnitude_masks(student))
    calls = []

    class Wrapped(torch.nn.Module):  # what train_step sees of a wrapped model
        def __init__(self):
            super().__init__()
            self.module = student

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    class FSDPLike(Wrapped):
        def set_requires_gradient_sync(self, enabled):
            calls.append(("fsdp", enabled))

    class DDPLike(Wrapped):
        def no_sync(self):
            calls.append(("ddp", False))
            return torch.enable_grad()

    args = ASTArgs(grad_accum=3, batch_size=2, seq_len=16, max_steps=2, warmup_steps=1)
    batches = TokenBatches(np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint32), 16, 2, seed=0)
    opt = train_ast.make_optimizer(student, layers, args)
    train_step(FSDPLike(), teacher, opt, batches, 0, args, "cpu", torch.float32)
    assert calls == [("fsdp", False), ("fsdp", False), ("fsdp", True)]
    calls.clear()
    train_step(DDPLike(), teacher, opt, batches, 1, args, "cpu", torch.float32)
    assert calls == [("ddp", False), ("ddp", False)]
