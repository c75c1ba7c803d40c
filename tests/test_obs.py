"""obs.py: the column walk SparseGPT and GPTQ share. SparseGPT against its code before the walk was shared
(frozen copy below, bit for bit); GPTQ against round-to-nearest (a diagonal Hessian: no error feedback, the
same grid), against an unblocked float64 reference written from the paper (explicit inverse-Hessian updates,
no Cholesky), its reconstruction error below RTN's, pruned entries exactly 0 and kept ones on the packed
grid; and the whole pipeline (kernels24.pack --quantizer gptq) against block-by-block captured inputs."""
import copy
import itertools
import shutil

import pytest
import torch

import checkpoint
import obs
import packed
import sparsity as sp
from cli import UserError
from data import c4_paths, calibration_windows
from kernels24 import pack
from model import PROJECTION_STAGES, PROJECTIONS, ModelArgs, Transformer


def correlated_inputs(n_tokens, dim, seed=0):
    """Inputs with strongly correlated features of very different scales (as real activations)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_tokens, dim // 4, generator=g) @ torch.randn(dim // 4, dim, generator=g)
    X = base + 0.3 * torch.randn(n_tokens, dim, generator=g)
    return X * torch.exp(torch.randn(dim, generator=g))  # per-feature scales over ~e^±2


def weight_2to4(out, n_in, seed=0):
    w = torch.randn(out, n_in, generator=torch.Generator().manual_seed(seed))
    return w * sp.nm_mask(w.abs(), 2, 4)


def rtn(w, keep, group_size=128):
    """Round-to-nearest through the packed format (packed.quantize4 on the stored slots), unpacked."""
    tensors, layout = packed.pack_state_dict({"w": w}, ["w"], {"w": keep}, bits=4, group_size=group_size)
    return packed.unpack_state_dict(tensors, layout)["w"]


def recon_error(X, W, W_hat):
    return torch.linalg.norm(X @ W.T - X @ W_hat.T).item()


# ----------------------------------------------------------------------------- SparseGPT: unchanged by the refactor

@torch.no_grad()
def sparsegpt_before_refactor(weight: torch.Tensor, hessian: torch.Tensor, sparsity, blocksize: int = 128,
              percdamp: float = 0.01, name: str | None = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1): prune column by column and let the later columns
    absorb each pruned weight's error through the inverse Hessian (the OBS update).

    hessian: H = (2/n) sum_t x_t x_t^T over the calibration tokens. Returns (new weight in weight.dtype,
    mask). All math in fp32 with TF32 off, whatever the model dtype.
    """
    rows, cols = weight.shape
    if isinstance(sparsity, tuple):
        n, m = sparsity
        if cols % m:
            sp.nm_mask(weight[:1], n, m, name=name)  # raises the clear error
        blocksize = max(m, blocksize // m * m)  # an N:M group never straddles two blocks
    tf32, threads = torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads()
    torch.backends.cuda.matmul.allow_tf32 = False
    if weight.device.type == "cpu":  # ~10 tiny ops a column: thread hand-offs cost more than the math (15x, 2 busy cores)
        torch.set_num_threads(1)
    try:
        W = weight.detach().float().clone()
        H = hessian.detach().float().clone()
        dead = torch.diag(H) == 0  # inputs that were always zero: their weights can go for free
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        Hinv = None
        for attempt in range(4):  # H is PSD; rarely the damping is too small for fp32 Cholesky
            L, info = torch.linalg.cholesky_ex(H + (damp * 10 ** attempt) * torch.eye(cols, device=H.device))
            if info == 0:
                Hinv = torch.cholesky_inverse(L)
                Hinv, info = torch.linalg.cholesky_ex(Hinv, upper=True)  # upper factor of H^-1 (Eq. 5 note)
                if info == 0:
                    break
        else:
            raise UserError(f"{name or 'layer'}: SparseGPT's Hessian is not positive definite even with "
                            f"{percdamp * 1000:g}x damping; use more calibration data (--nsamples)")
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            ErrT = torch.zeros(i2 - i1, rows, device=W.device)  # transposed: each column's error is contiguous
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned
            if not isinstance(sparsity, tuple):  # unstructured: choose over the whole rows x block
                score = W1 ** 2 / d.unsqueeze(0) ** 2
                k = int(score.numel() * sparsity)
                mask1.view(-1)[torch.sort(score.view(-1), stable=True).indices[:k]] = True
                scale = mask1 / d  # err = w / [H^-1]_jj where pruned, 0 where kept
            else:
                scale = torch.empty_like(W1)
            for i in range(i2 - i1):
                if isinstance(sparsity, tuple) and i % m == 0:  # N:M: decide the next group with updated W
                    score = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                    mask1.scatter_(1, i + torch.topk(score, m - n, dim=1, largest=False).indices, True)
                    torch.div(mask1[:, i:i + m], d[i:i + m], out=scale[:, i:i + m])
                torch.mul(W1[:, i], scale[:, i], out=ErrT[i])
                W1[:, i:].addr_(ErrT[i], Hinv1[i, i:], alpha=-1)  # OBS update of the rest of the block
            W[:, i1:i2] = W1  # pruned columns are ~0 here, exactly 0 below; kept ones got err = 0
            pruned[:, i1:i2] = mask1
            W[:, i2:] -= ErrT.T @ Hinv[i1:i2, i2:]  # the block's error, to all later columns at once
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_num_threads(threads)
    mask = ~pruned
    W[pruned] = 0.0
    return W.to(weight.dtype), mask



@pytest.mark.parametrize("pattern", [0.5, (2, 4), (4, 8), 0.0, 0.7])
@pytest.mark.parametrize("blocksize", [128, 32, 20])
def test_sparsegpt_is_bit_for_bit_what_it_was_before_the_shared_walk(pattern, blocksize):
    X = correlated_inputs(1024, 256, seed=7)
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(8))
    H = 2 * X.T @ X / 1024
    new, mask = obs.sparsegpt(W, H, pattern, blocksize=blocksize)
    old, old_mask = sparsegpt_before_refactor(W, H, pattern, blocksize=blocksize)
    assert torch.equal(mask, old_mask) and torch.equal(new, old)
    assert sp.sparsegpt is obs.sparsegpt  # sparsity.prune calls this one


def test_sparsegpt_dead_inputs_bf16_and_damping_retries_unchanged():
    X = correlated_inputs(512, 64)
    X[:, 5] = 0
    W = torch.randn(16, 64).to(torch.bfloat16)
    H = 2 * X.T @ X / 512
    for args in ((H, (2, 4)), (H, 0.5), (torch.zeros(64, 64) + 1e-3 * torch.ones(64, 64), (2, 4))):  # rank 1: retries
        new, mask = obs.sparsegpt(W, *args, blocksize=32)
        old, old_mask = sparsegpt_before_refactor(W, *args, blocksize=32)
        assert torch.equal(mask, old_mask) and torch.equal(new, old) and new.dtype == torch.bfloat16
    with pytest.raises(UserError, match=r"wq: input dim 10 is not a multiple of M=4"):
        obs.sparsegpt(torch.randn(4, 10), torch.eye(10), (2, 4), name="wq")


# ----------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("n_in", [512, 640, 1000])  # 640, 1000: each row's last group is short (64 / 116 kept)
def test_gptq_without_error_feedback_is_round_to_nearest(n_in):
    """A diagonal Hessian has a diagonal inverse: no error reaches the other columns, and each group's grid is
    computed from untouched weights, so GPTQ must be RTN exactly (same grid, same codes, same floats)."""
    W = weight_2to4(24, n_in, seed=1)
    W[0] = (W[0].abs() + 0.5) * (W[0] != 0)  # kept values > 0.5: a grid counting the pruned zeros differs
    keep = packed.slot_mask(packed.check_2to4("w", W))
    H = torch.diag(torch.rand(n_in, generator=torch.Generator().manual_seed(2)) + 0.1)
    for hessian in (H, torch.eye(n_in)):
        W_hat, scales, mins = obs.gptq(W, hessian, keep, group_cols=256)
        assert torch.equal(W_hat, rtn(W, keep))
    dense = torch.randn(8, 300)  # no pruning at all: groups of 100 inputs, against quantize4 on the rows
    W_hat, scales, mins = obs.gptq(dense, torch.eye(300), torch.ones(8, 300, dtype=torch.bool), group_cols=100)
    codes, s, m = packed.quantize4(dense, 100)
    assert torch.equal(scales, s) and torch.equal(mins, m)
    assert torch.equal(W_hat, packed.dequantize4(codes, s, m, dense.shape, 100))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_layer_error_is_below_round_to_nearest(seed):
    X = correlated_inputs(2048, 512, seed=seed)
    W = weight_2to4(64, 512, seed=seed + 10)
    keep = packed.slot_mask(packed.check_2to4("w", W))
    W_hat, _, _ = obs.gptq(W, 2 * X.T @ X / X.shape[0], keep, group_cols=256)
    err_gptq, err_rtn = recon_error(X, W, W_hat), recon_error(X, W, rtn(W, keep))
    assert err_gptq < 0.95 * err_rtn, (err_gptq, err_rtn)  # measured 0.91x, 0.71x, 0.79x


@pytest.mark.parametrize("group_cols, blocksize", [(256, 128), (64, 128), (256, 96), (1000, 128)])
def test_gptq_keeps_zeros_and_puts_kept_values_on_the_packed_grid(group_cols, blocksize):
    X = correlated_inputs(1024, 512, seed=3)
    X[:, 7] = 0  # a dead input: its weight goes to 0 before quantization, still a kept slot on the grid
    W = weight_2to4(40, 512, seed=4)
    keep = packed.slot_mask(packed.check_2to4("w", W))
    W_hat, scales, mins = obs.gptq(W, 2 * X.T @ X / 1024, keep, group_cols, blocksize=blocksize)
    assert W_hat.dtype == torch.float32 and (W_hat[~keep] == 0).all()  # exactly 0, not ~0
    assert scales.shape == mins.shape == (40, -(-512 // group_cols)) and scales.dtype == torch.float16
    s = scales.float().repeat_interleave(group_cols, dim=1)[:, :512]
    m = mins.float().repeat_interleave(group_cols, dim=1)[:, :512]
    q = (W_hat - m) / s
    assert ((q - q.round()).abs()[keep] < 1e-3).all() and (q.round()[keep] >= 0).all() and (q.round()[keep] <= 15).all()
    assert torch.equal(W_hat[keep], (m + q.round() * s)[keep])  # bit for bit the grid point packed.py unpacks
    if group_cols % 2 == 0 and group_cols % 4 == 0:  # whole groups of 4: it packs, and unpacks to the same floats
        grid = {"w": (scales, mins)}
        tensors, layout = packed.pack_state_dict({"w": W_hat}, ["w"], {"w": keep}, 4, group_cols // 2, grids=grid)
        assert torch.equal(packed.unpack_state_dict(tensors, layout)["w"], W_hat)


@torch.no_grad()
def gptq_reference(W, H, keep, group_cols, percdamp=0.01, act_order=False):
    """GPTQ as the paper derives it (§3-4 from OBQ), float64, one column at a time, no blocks and no Cholesky:
    quantize column j (0 if pruned), err = (w_j - q_j) / [H^-1]_jj, w_rest -= err * [H^-1]_{j,rest}, then remove
    j from the inverse Hessian: H^-1 -= H^-1[:, j] H^-1[j, :] / [H^-1]_jj. A group's grid: packed.grid4 of its
    kept values when column j reaches it; with act_order the columns go by decreasing H_jj and every grid is
    made from the untouched weight first (static groups)."""
    W, H = W.double().clone(), H.double()
    cols = W.shape[1]
    Hinv = torch.linalg.inv(H + percdamp * H.diag().mean() * torch.eye(cols, dtype=H.dtype))
    grids = {}
    def grid(j):
        g = j // group_cols
        if g not in grids or not act_order and j % group_cols == 0:
            part, k = W[:, g * group_cols:(g + 1) * group_cols], keep[:, g * group_cols:(g + 1) * group_cols]
            lo = torch.where(k, part, torch.inf).amin(1).float()
            hi = torch.where(k, part, -torch.inf).amax(1).float()
            grids[g] = [t.double() for t in packed.grid4(lo, hi)]
        return grids[g]
    if act_order:
        for j in range(0, cols, group_cols):
            grid(j)
    order = sorted(range(cols), key=lambda j: -H[j, j].item()) if act_order else range(cols)
    for j in order:
        s, m = grid(j)
        q = torch.where(s > 0, ((W[:, j] - m) / s).round(), 0).clamp(0, 15) * s + m
        q = torch.where(keep[:, j], q, 0.0)
        err = (W[:, j] - q) / Hinv[j, j]
        W -= err[:, None] * Hinv[j, :][None, :]  # the columns already done have zero rows left in H^-1
        W[:, j] = q
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return W


@pytest.mark.parametrize("group_cols, blocksize, act_order", [(256, 128, False), (64, 128, False), (128, 32, False),
                                                           (64, 128, True), (128, 32, True)])
def test_gptq_equals_an_unblocked_float64_reference(group_cols, blocksize, act_order):
    """Blocks, lazy batched updates and the Cholesky rows are only a faster way to the same walk: nearly every
    code agrees (a float32 rounding near a half step may flip one) and the layer's error is the same; with
    act-order too (columns by decreasing H_jj, grids fixed first)."""
    scale = torch.linspace(0.2, 3, 256)[torch.randperm(256, generator=torch.Generator().manual_seed(7))]
    X = correlated_inputs(2048, 256, seed=5) * scale  # H_jj all differ, so the act-order walk is a real reordering
    W = weight_2to4(32, 256, seed=6)
    H = 2 * X.T @ X / 2048
    keep = packed.slot_mask(packed.check_2to4("w", W))
    W_hat, _, _ = obs.gptq(W, H, keep, group_cols, blocksize=blocksize, act_order=act_order)
    ref = gptq_reference(W, H, keep, group_cols, act_order=act_order)
    close = torch.isclose(W_hat.double(), ref, rtol=1e-4, atol=1e-5)
    assert close[keep].float().mean() > 0.995 and close[~keep].all()  # measured: every entry agrees
    assert recon_error(X, W, W_hat) == pytest.approx(recon_error(X.double(), W.double(), ref), rel=1e-3)
    if act_order:  # and the order matters: the walk in the weight's own order is another result
        assert recon_error(X, W, obs.gptq(W, H, keep, group_cols, blocksize=blocksize)[0]) != pytest.approx(
            recon_error(X, W, W_hat), rel=1e-3)


def test_act_order_without_error_feedback_changes_nothing():
    """With a diagonal H no column's error reaches another, so the order of the walk cannot matter."""
    W = weight_2to4(16, 128, seed=3)
    H = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.5)
    a, sa, ma = obs.gptq(W, H, W != 0, group_cols=32)
    b, sb, mb = obs.gptq(W, H, W != 0, group_cols=32, act_order=True)
    assert torch.equal(a, b) and torch.equal(sa, sb) and torch.equal(ma, mb)


def test_gptq_refuses_bad_input():
    W = weight_2to4(8, 32)
    with pytest.raises(UserError, match="wq: keep must be a bool mask of shape"):
        obs.gptq(W, torch.eye(32), torch.ones(8, 16, dtype=torch.bool), 16, name="wq")
    with pytest.raises(UserError, match="at least one input"):
        obs.gptq(W, torch.eye(32), W != 0, 0)
    with pytest.raises(UserError, match="GPTQ's Hessian is not positive definite"):
        obs.gptq(W, -torch.eye(32), W != 0, 16, percdamp=0.0)


# ----------------------------------------------------------------------------- kernels24.pack --quantizer gptq

def capture_inputs(model, calib, names):
    """Inputs of the named linears for the whole calibration batch, through full model forwards."""
    modules, got, handles = dict(model.named_modules()), {n: [] for n in names}, []
    for n in names:
        handles.append(modules[n].register_forward_pre_hook(
            lambda m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in got.items()}


@pytest.mark.parametrize("act_order,true_sequential", [(False, False), (True, False), (False, True)])
def test_pack_gptq_calibrates_each_block_on_quantized_blocks(tmp_path, data_dir, act_order, true_sequential):
    """kernels24.pack --quantizer gptq [--act-order] == GPTQ of every layer on the inputs that full forwards through
    the already quantized blocks give (rebuilt here), written into the packed format; load() returns GPTQ's floats.
    --true-sequential: inside a block too, each stage on the outputs of the quantized stages before it."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=128,
                                  max_seq_len=64)).eval()
    masks = sp.prune(model, "magnitude", (2, 4))
    checkpoint.save(model, None, tmp_path / "ck", masks=masks)
    shutil.copy(data_dir / "tokenizers" / "llama2" / "tokenizer.model", tmp_path / "ck")
    flags = ["--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "gptq"), "--bits", "4", "--quantizer", "gptq",
             "--group-size", "32", "--nsamples", "4", "--calib-len", "32", "--data-dir", str(data_dir),
             "--device", "cpu"] + ["--act-order"] * act_order + ["--true-sequential"] * true_sequential
    report = pack.main(flags)
    assert report["gptq_s"] > 0
    got, _ = checkpoint.load(tmp_path / "gptq", tokenizer=False)
    got = dict(got.named_modules())
    _, tok = checkpoint.load(tmp_path / "ck")
    calib = calibration_windows(tok, c4_paths(data_dir), 4, 32, 0)
    ref, flips = copy.deepcopy(model), []
    modules = dict(ref.named_modules())
    stages = PROJECTION_STAGES if true_sequential else [PROJECTIONS]
    for b, stage in itertools.product(range(2), stages):
        names = [f"layers.{b}.{p}" for p in stage]
        X = capture_inputs(ref, calib, names)
        with torch.no_grad():
            for n in names:
                H = (2 * X[n].T @ X[n] / X[n].shape[0]).float()
                W_hat, _, _ = obs.gptq(modules[n].weight, H, masks[n], group_cols=64, act_order=act_order)
                assert (got[n].weight[~masks[n]] == 0).all(), n
                flips.append((~torch.isclose(W_hat, got[n].weight, rtol=1e-4, atol=1e-6)).float().mean().item())
                modules[n].weight.copy_(got[n].weight)  # the next block sees what the pipeline made
    assert max(flips) < 0.01, flips  # Hessians summed in another order could flip a rare code (measured: none)
    for name in ("norm.weight", "tok_embeddings.weight"):
        assert torch.equal(ref.state_dict()[name], model.state_dict()[name])


def test_pack_gptq_bf16_keeps_the_codes_of_fp32(tmp_path, data_dir):
    """--dtype bfloat16 casts the other tensors; GPTQ's weights give their codes before any cast (fp32 grid
    points), so the bf16 file unpacks to the fp32 file's weights rounded to bf16."""
    torch.manual_seed(1)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=128,
                                  max_seq_len=64)).eval()
    checkpoint.save(model, None, tmp_path / "ck", masks=sp.prune(model, "magnitude", (2, 4)))
    shutil.copy(data_dir / "tokenizers" / "llama2" / "tokenizer.model", tmp_path / "ck")
    states = {}
    for dtype in ("float32", "bfloat16"):
        pack.main(["--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / dtype), "--bits", "4", "--quantizer",
                   "gptq", "--group-size", "32", "--nsamples", "2", "--calib-len", "32", "--data-dir", str(data_dir),
                   "--device", "cpu", "--dtype", dtype])
        states[dtype] = packed.load_packed_state_dict(tmp_path / dtype)
    for name, w in states["float32"].items():
        assert states["bfloat16"][name].dtype == torch.bfloat16 and torch.equal(states["bfloat16"][name], w.bfloat16())


def test_pack_gptq_flags_fail_before_any_work(tmp_path, cli_error, data_dir, monkeypatch):
    ckpt = tmp_path / "ck"
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128))
    checkpoint.save(model, None, ckpt, masks=sp.prune(model, "magnitude", (2, 4)))
    base = ["--ckpt", str(ckpt), "--out", str(tmp_path / "o")]
    bad = {"--quantizer gptq quantizes to 4 bits: add --bits 4": ["--quantizer", "gptq"],
           "--act-order is an option of GPTQ: add --quantizer gptq --bits 4": ["--bits", "4", "--act-order"],
           "--true-sequential is an option of GPTQ: add --quantizer gptq --bits 4": ["--true-sequential"],
           "--group-size 127: GPTQ needs an even group size": ["--quantizer", "gptq", "--bits", "4", "--group-size",
                                                                "127"],
           "no C4 calibration text": ["--quantizer", "gptq", "--bits", "4", "--data-dir", str(tmp_path)]}
    for message, argv in bad.items():
        assert message in cli_error(lambda: pack.main(base + argv))
    assert not (tmp_path / "o").exists()
    dense = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128))
    checkpoint.save(dense, None, tmp_path / "dense")  # not 2:4: refused before the model is loaded to calibrate
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("loaded the model before checking 2:4"))
    with pytest.raises(UserError, match=r"layers\.0\.attention\.w[qkvo]\.weight: not 2:4 sparse"):
        pack.main(["--ckpt", str(tmp_path / "dense"), "--out", str(tmp_path / "o"), "--bits", "4", "--quantizer",
                   "gptq", "--group-size", "32", "--data-dir", str(data_dir)])
