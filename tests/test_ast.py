"""train_ast.py: the AST method on tiny models (CPU, seconds), resume, DDP equivalence, and a behaviour test."""
import math
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
