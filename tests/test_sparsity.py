"""Masks, the three pruning criteria against brute-force definitions, SparseGPT's invariants, and the
sequential pipeline on a tiny Llama."""
import copy
import re
import shutil

import pytest
import torch

import checkpoint
import sparsity as sp
from cli import UserError, cli_main
from kernels24 import pack
from model import ModelArgs, Transformer
from packed import PACKED_FILE


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=64)
    kw.update(overrides)
    return Transformer(ModelArgs(**kw)).eval()


def correlated_inputs(n_tokens, dim, seed=0):
    """Inputs with strongly correlated features of very different scales (as real activations)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_tokens, dim // 4, generator=g) @ torch.randn(dim // 4, dim, generator=g)
    X = base + 0.3 * torch.randn(n_tokens, dim, generator=g)
    return X * torch.exp(torch.randn(dim, generator=g))  # per-feature scales over ~e^±2


# -----------------------------------------------------------------------------
# patterns


def test_parse_sparsity():
    assert sp.parse_sparsity("2:4") == (2, 4)
    assert sp.parse_sparsity("4:8") == (4, 8)
    assert sp.parse_sparsity("0.5") == 0.5
    assert sp.parse_sparsity("50%") == 0.5
    for bad in ["3:2", "0:4", "1.0", "-0.1", "half", "2:4:8"]:
        with pytest.raises(UserError):
            sp.parse_sparsity(bad)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8), (2, 2)])
def test_nm_mask_keeps_exactly_n_largest_of_every_m(n, m):
    score = torch.randn(16, 8 * m)
    mask = sp.nm_mask(score, n, m)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    groups, kept = score.reshape(-1, m), mask.reshape(-1, m)
    assert (kept.sum(-1) == n).all()
    for g, k in zip(groups.tolist(), kept.tolist()):  # brute force: the kept ones are the n largest
        assert sorted(i for i in range(m) if k[i]) == sorted(sorted(range(m), key=lambda i: -g[i])[:n])
    assert sp.check_mask(mask, (n, m)) and sp.check_nm(score * mask, n, m)
    assert not sp.check_nm(score, n, m) or n == m


def test_nm_mask_with_ties_still_keeps_exactly_n():
    score = torch.zeros(4, 16)  # all tied, as |w| on a 4-bit grid often is
    assert (sp.nm_mask(score, 2, 4).reshape(-1, 4).sum(-1) == 2).all()
    mask = sp.unstructured_mask(torch.zeros(4, 16), 0.5)
    assert (mask.sum(-1) == 8).all()


def test_nm_error_names_the_layer():
    with pytest.raises(UserError, match=r"layers\.3\.feed_forward\.w2.*input dim 10.*M=4"):
        sp.nm_mask(torch.randn(4, 10), 2, 4, name="layers.3.feed_forward.w2")


def test_checkers_reject_wrong_patterns():
    w = torch.randn(8, 16)
    mask = sp.nm_mask(w.abs(), 2, 4)
    assert sp.check_layer(w * mask, mask, (2, 4))
    assert not sp.check_layer(w, mask, (2, 4))  # pruned entries not zero
    bad = mask.clone()
    bad[0, :4] = True
    assert not sp.check_mask(bad, (2, 4)) and not sp.check_mask(mask.int(), (2, 4))
    assert sp.check_mask(sp.unstructured_mask(w, 0.5), 0.5) and not sp.check_mask(mask | True, 0.5)


# -----------------------------------------------------------------------------
# criteria vs brute-force definitions


def brute_prune_rows(score, k):
    """For each row, the set of the k smallest-score columns (plain Python)."""
    return [set(sorted(range(len(row)), key=lambda j: (row[j], j))[:k]) for row in score.tolist()]


def brute_nm(score, n, m):
    mask = []
    for row in score.tolist():
        keep = set()
        for g in range(0, len(row), m):
            keep |= set(sorted(range(g, g + m), key=lambda j: -row[j])[:n])
        mask.append([j in keep for j in range(len(row))])
    return torch.tensor(mask)


def test_magnitude_mask_equals_brute_force():
    w = torch.randn(12, 32)
    flat = w.abs().flatten().tolist()
    k = int(len(flat) * 0.5)
    pruned = set(sorted(range(len(flat)), key=lambda i: flat[i])[:k])  # whole layer, as the official baseline
    expect = torch.tensor([i not in pruned for i in range(len(flat))]).reshape(w.shape)
    assert torch.equal(sp.magnitude_mask(w, 0.5), expect)
    assert torch.equal(sp.magnitude_mask(w, (2, 4)), brute_nm(w.abs(), 2, 4))
    assert torch.equal(sp.magnitude_mask(w, (4, 8)), brute_nm(w.abs(), 4, 8))


def test_wanda_mask_equals_brute_force():
    w, X = torch.randn(12, 32), correlated_inputs(200, 32)
    sq = (X * X).sum(0)
    score = [[abs(w[i, j].item()) * sum(X[t, j].item() ** 2 for t in range(X.shape[0])) ** 0.5
              for j in range(32)] for i in range(12)]
    score = torch.tensor(score, dtype=torch.float64)
    pruned = brute_prune_rows(score, 16)
    expect = torch.tensor([[j not in pruned[i] for j in range(32)] for i in range(12)])
    assert torch.equal(sp.wanda_mask(w, sq, 0.5), expect)
    assert torch.equal(sp.wanda_mask(w, sq, (2, 4)), brute_nm(score, 2, 4))


# -----------------------------------------------------------------------------
# SparseGPT


def recon_error(X, W, W_hat):
    return torch.linalg.norm(X @ W.T - X @ W_hat.T).item()


@pytest.mark.parametrize("pattern", [0.5, (2, 4)])
def test_reconstruction_error_sparsegpt_lt_wanda_lt_magnitude(pattern):
    X = correlated_inputs(2048, 256, seed=1)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    H = 2 * X.T @ X / X.shape[0]
    err_mag = recon_error(X, W, W * sp.magnitude_mask(W, pattern))
    err_wanda = recon_error(X, W, W * sp.wanda_mask(W, (X * X).sum(0), pattern))
    W_sgpt, mask = sp.sparsegpt(W, H, pattern)
    assert sp.check_layer(W_sgpt, mask, pattern)
    err_sgpt = recon_error(X, W, W_sgpt)
    assert err_sgpt < err_wanda < err_mag, (err_sgpt, err_wanda, err_mag)


@pytest.mark.parametrize("pattern", [0.0, (4, 4)])
def test_sparsegpt_without_pruning_returns_weights_unchanged(pattern):
    X = correlated_inputs(512, 64)
    W = torch.randn(16, 64)
    W_new, mask = sp.sparsegpt(W, 2 * X.T @ X / 512, pattern, blocksize=16)
    assert mask.all() and torch.equal(W_new, W)


def test_sparsegpt_blocks_are_exact_lazy_updates():
    """Blocks only batch the OBS updates: N:M results don't depend on the block size (to fp32 rounding)."""
    X = correlated_inputs(1024, 96, seed=3)
    W = torch.randn(24, 96)
    H = 2 * X.T @ X / 1024
    W_a, m_a = sp.sparsegpt(W, H, (2, 4), blocksize=8)
    W_b, m_b = sp.sparsegpt(W, H, (2, 4), blocksize=96)
    assert torch.equal(m_a, m_b)
    torch.testing.assert_close(W_a, W_b, rtol=1e-4, atol=1e-4)


def test_sparsegpt_handles_dead_inputs_and_low_precision():
    X = correlated_inputs(512, 64)
    X[:, 5] = 0  # an input that never fires: H_jj = 0
    W = torch.randn(16, 64).to(torch.bfloat16)
    W_new, mask = sp.sparsegpt(W, 2 * X.T @ X / 512, (2, 4), blocksize=32)
    assert W_new.dtype == torch.bfloat16 and torch.isfinite(W_new.float()).all()
    assert (W_new[:, 5] == 0).all() and sp.check_layer(W_new, mask, (2, 4))


def test_sparsegpt_reduces_error_over_its_own_mask():
    """The OBS update is what SparseGPT adds: its weights beat its own mask applied to the dense weights."""
    X = correlated_inputs(1024, 128, seed=4)
    W = torch.randn(32, 128)
    W_new, mask = sp.sparsegpt(W, 2 * X.T @ X / 1024, (2, 4))
    assert recon_error(X, W, W_new) < 0.8 * recon_error(X, W, W * mask)


# -----------------------------------------------------------------------------
# layers and the sequential pipeline on a tiny Llama


def test_prunable_linears_are_the_seven_projections():
    model = tiny_model(tie_embeddings=True)
    names = list(sp.prunable_linears(model))
    assert len(names) == 14 and names[0] == "layers.0.attention.wq" and names[-1] == "layers.1.feed_forward.w3"
    assert not any("embeddings" in n or "norm" in n or n == "output" for n in names)
    assert list(sp.prunable_linears(model, "1,w1,w2")) == ["layers.1.feed_forward.w1", "layers.1.feed_forward.w2"]
    assert len(sp.prunable_linears(model, "0-1")) == 14
    for bad in ["7", "wz", "1-x", "1-0", "attention.wq"]:
        with pytest.raises(UserError):
            sp.prunable_linears(model, bad)


def capture_inputs(model, calib, names):
    """Inputs of the named linears for the whole calibration batch, through full model forwards."""
    modules, got, handles = dict(model.named_modules()), {n: [] for n in names}, []
    for n in names:
        handles.append(modules[n].register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in got.items()}


@pytest.mark.parametrize("pattern", [0.5, (2, 4)])
def test_sequential_wanda_equals_reference(pattern):
    """Block l is scored on the outputs of the already-pruned blocks < l: rebuild that with full forwards."""
    model = tiny_model()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model)
    masks = sp.prune(model, "wanda", pattern, calib, log=lambda *a, **k: None)
    modules = dict(ref.named_modules())
    for b in range(2):
        names = [n for n in sp.prunable_linears(ref) if n.startswith(f"layers.{b}.")]
        X = capture_inputs(ref, calib, names)
        for n in names:
            score = modules[n].weight.double().abs() * X[n].pow(2).sum(0).sqrt()
            if isinstance(pattern, tuple):
                expect = brute_nm(score, *pattern)
            else:
                k = int(score.shape[1] * pattern)
                expect = torch.ones_like(score, dtype=torch.bool)
                for i, cols in enumerate(brute_prune_rows(score, k)):
                    expect[i, list(cols)] = False
            assert torch.equal(masks[n], expect), n
        with torch.no_grad():
            for n in names:
                modules[n].weight.mul_(masks[n])
    for n, p in model.state_dict().items():
        torch.testing.assert_close(p, ref.state_dict()[n], rtol=0, atol=0)


@pytest.mark.parametrize("d", [5, 192, 400])
def test_gram_upper_triangle_mirrors_to_the_full_product(d):
    x = torch.randn(300, d, dtype=torch.float64)
    gram = torch.zeros(d, d, dtype=torch.float64)
    sp.add_gram_upper(gram, x[:100], block=64)
    sp.add_gram_upper(gram, x[100:], block=64)
    full = gram.triu() + gram.triu(1).T
    torch.testing.assert_close(full, x.T @ x)


def test_sequential_sparsegpt_uses_pruned_inputs():
    model = tiny_model(seed=1)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    masks = sp.prune(model, "sparsegpt", (2, 4), calib, log=lambda *a, **k: None)
    modules, pruned = dict(ref.named_modules()), dict(model.named_modules())
    for b in range(2):
        names = [n for n in sp.prunable_linears(ref) if n.startswith(f"layers.{b}.")]
        X = capture_inputs(ref, calib, names)
        with torch.no_grad():
            for n in names:
                W_new, mask = sp.sparsegpt(modules[n].weight, (2 * X[n].T @ X[n] / X[n].shape[0]).float(), (2, 4))
                assert torch.equal(mask, masks[n]), n
                torch.testing.assert_close(W_new, pruned[n].weight, rtol=1e-4, atol=1e-5)
                modules[n].weight.copy_(pruned[n].weight)


def test_calibration_batching_does_not_change_the_result(monkeypatch):
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    batched, one_by_one = tiny_model(), tiny_model()
    masks = sp.prune(batched, "sparsegpt", "2:4", calib, log=lambda *a, **k: None)  # 4 windows per forward
    monkeypatch.setattr(sp, "BATCH_TOKENS", 32)  # 1 window per forward
    masks_1 = sp.prune(one_by_one, "sparsegpt", "2:4", calib, log=lambda *a, **k: None)
    for n in masks:
        assert torch.equal(masks[n], masks_1[n]), n
    for n, p in batched.state_dict().items():
        torch.testing.assert_close(p, one_by_one.state_dict()[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", sp.METHODS)
@pytest.mark.parametrize("pattern", ["0.5", "2:4", "4:8"])
def test_prune_every_method_and_pattern(method, pattern):
    model = tiny_model()
    calib = torch.randint(0, 256, (2, 16))
    report = {}
    masks = sp.prune(model, method, pattern, calib, report=report, log=lambda *a, **k: None)
    assert sorted(masks) == sorted(sp.prunable_linears(model))
    sp.verify(model, masks, sp.parse_sparsity(pattern))
    assert model.tok_embeddings.weight.count_nonzero() == model.tok_embeddings.weight.numel()
    assert report["total_s"] >= report["method_s"] >= 0
    with torch.no_grad():
        assert torch.isfinite(model(calib)).all()


def test_layers_filter_prunes_only_those():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    masks = sp.prune(model, "sparsegpt", "2:4", torch.randint(0, 256, (2, 16)), layers="0,w2", log=lambda *a, **k: None)
    assert list(masks) == ["layers.0.feed_forward.w2"]
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]) == (n != "layers.0.feed_forward.w2.weight"), n


def test_indivisible_dim_is_a_clear_error_before_any_work():
    model = tiny_model(hidden_dim=100)  # w2's input dim 100 is not a multiple of 8
    w = model.layers[0].attention.wq.weight.clone()
    with pytest.raises(UserError, match=r"layers\.0\.feed_forward\.w2: input dim 100 is not a multiple of M=8"):
        sp.prune(model, "wanda", "4:8", torch.randint(0, 256, (2, 16)), log=lambda *a, **k: None)
    assert torch.equal(model.layers[0].attention.wq.weight, w)


def test_cli_indivisible_dim_fails_before_reading_data(tmp_path, data_dir):
    """sparsity.py names the layer before the dense evaluation: the data dir given here is empty."""
    checkpoint.save(tiny_model(hidden_dim=100), None, tmp_path / "ck")
    shutil.copy(data_dir / "tokenizers" / "llama2" / "tokenizer.model", tmp_path / "ck")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"layers\.0\.feed_forward\.w2: input dim 100 is not a multiple of M=8"):
        sp.main(["--ckpt", str(tmp_path / "ck"), "--method", "wanda", "--sparsity", "4:8",
                 "--data-dir", str(tmp_path / "empty"), "--device", "cpu"])


def test_saved_checkpoint_keeps_exact_zeros_and_masks(tmp_path):
    model = tiny_model()
    masks = sp.prune(model, "sparsegpt", "2:4", torch.randint(0, 256, (2, 16)), log=lambda *a, **k: None)
    checkpoint.save(model, None, tmp_path / "ck", masks=masks)
    loaded = checkpoint.load(tmp_path / "ck", tokenizer=False)
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    back = checkpoint.load_masks(tmp_path / "ck")
    assert sorted(back) == sorted(masks)
    modules = dict(loaded.named_modules())
    for n, mask in masks.items():
        assert back[n].dtype == torch.bool and torch.equal(back[n], mask)
        assert torch.equal(modules[n].weight, dict(model.named_modules())[n].weight)
        assert (modules[n].weight[~mask] == 0).all() and sp.check_nm(modules[n].weight, 2, 4)


def test_cli_rejects_bad_input(capsys, monkeypatch):
    monkeypatch.setattr(sp, "load", lambda *a, **k: pytest.fail("loaded a model before checking the flags"))
    with pytest.raises(UserError, match="sparsity"):
        sp.main(["--sparsity", "5:4"])
    with pytest.raises(SystemExit) as e:  # --method is a choice: argparse names the flag and the choices
        sp.main(["--method", "obs"])
    assert e.value.code == 2 and "--method: invalid choice: 'obs'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ppl-seq-len", "0"], "--ppl-seq-len 0: must be positive"),
    (["--ppl-windows", "-1"], "--ppl-windows -1: must be 0 (all windows) or more"),
    (["--nsamples", "0"], "--nsamples 0: must be positive"),
])
def test_cli_bad_numbers_end_in_one_error_line_before_loading(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sp, "load", lambda *a, **k: pytest.fail("loaded a model before checking the flags"))
    with pytest.raises(SystemExit) as e:
        cli_main(lambda: sp.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err == f"error: {message}\n"


def test_cli_magnitude_on_a_tiny_checkpoint_prints_the_protocol(tmp_path, data_dir, capsys):
    """The whole script on a tiny Llama: the perplexity protocol line reads as it always has, --ppl-windows
    picks the windows, and the saved checkpoint keeps the masks and the protocol."""
    checkpoint.save(tiny_model(vocab_size=32000), None, tmp_path / "ck")
    shutil.copy(data_dir / "tokenizers" / "llama2" / "tokenizer.model", tmp_path / "ck")
    (tmp_path / "data" / "wikitext-2-raw").mkdir(parents=True)
    text = " = Tiny = \n\n The cat sat on the mat , and then it slept for a while . \n" * 20
    (tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw").write_text(text)
    res = sp.main(["--ckpt", str(tmp_path / "ck"), "--method", "magnitude", "--sparsity", "2:4", "--ppl-seq-len",
                   "32", "--ppl-windows", "2", "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                   "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    windows = int(out.split(" of ")[1].split()[0])
    protocol = f"WikiText-2 test, seq-len 32, first 2 of {windows} windows, BOS yes"
    assert windows > 2 and f"({protocol}; " in out and f"magnitude 2:4 ppl {res['ppl']:.3f} ({protocol})" in out
    assert 1 < res["dense_ppl"] and 1 < res["ppl"]
    assert len(checkpoint.load_masks(tmp_path / "out")) == 14
    # a second run into the same --out is refused before any work, unless --overwrite
    argv = ["--ckpt", str(tmp_path / "ck"), "--method", "magnitude", "--sparsity", "4:8", "--no-eval",
            "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--out", str(tmp_path / "out")]
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds .*--overwrite"):
        sp.main(argv)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    sp.main(argv + ["--overwrite"])
    assert checkpoint.load(tmp_path / "out", tokenizer=False)[0] is not None


@pytest.mark.slow
def test_cli_on_smollm2_end_to_end(tmp_path, data_dir):
    """The real model through the CLI on two blocks: pattern verified, checkpoint loads with its zeros and masks."""
    out = tmp_path / "wanda24"
    res = sp.main(["--ckpt", "smollm2-135m", "--method", "wanda", "--sparsity", "2:4", "--nsamples", "2",
                   "--calib-len", "128", "--ppl-seq-len", "256", "--ppl-windows", "1", "--layers", "0-1",
                   "--data-dir", str(data_dir), "--device", "cpu", "--out", str(out)])
    assert 1 < res["dense_ppl"] < res["ppl"] < 1e4
    model, _ = checkpoint.load(str(out))
    masks = checkpoint.load_masks(out)
    assert len(masks) == 14
    modules = dict(model.named_modules())
    for n, mask in masks.items():
        assert sp.check_layer(modules[n].weight, mask, (2, 4)), n
    assert modules["layers.2.attention.wq"].weight.count_nonzero() > 0.9 * modules["layers.2.attention.wq"].weight.numel()


# ----------------------------------------------------------------------------- bad input: one line, nothing touched

def test_layers_naming_a_block_the_model_lacks_is_an_error_not_ignored():
    model = tiny_model()  # blocks 0-1
    before = copy.deepcopy(model.state_dict())
    for spec, says in [("0-1,99", "block 99 does not exist (the model has blocks 0-1)"),
                       ("1-5", "block 2 does not exist"), (",", "names no layer")]:
        with pytest.raises(UserError, match=re.escape(f"--layers '{spec}'") + ".*" + re.escape(says)):
            sp.prune(model, "magnitude", "2:4", layers=spec)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert sp.parse_layers("0-1,3,wq,w2") == ([(0, 1), (3, 3)], {"attention.wq", "feed_forward.w2"})
    with pytest.raises(UserError, match="block 2 does not exist"):  # a huge range is never spelled out
        sp.prune(model, "magnitude", "2:4", layers="0-100000000000000")


def tiny_ckpt(tmp_path, data_dir, **overrides):
    checkpoint.save(tiny_model(vocab_size=32000, **overrides), None, tmp_path / "ck")
    shutil.copy(data_dir / "tokenizers" / "llama2" / "tokenizer.model", tmp_path / "ck")
    return tmp_path / "ck"


def test_cli_layers_out_of_range_fails_before_the_dense_evaluation(tmp_path, data_dir, monkeypatch, cli_error):
    monkeypatch.setattr(sp, "WikiText2", lambda *a, **k: pytest.fail("evaluated before checking --layers"))
    ck = tiny_ckpt(tmp_path, data_dir)
    err = cli_error(lambda: sp.main(["--ckpt", str(ck), "--method", "magnitude", "--layers", "0-1,99",
                                     "--data-dir", str(data_dir), "--device", "cpu"]))
    assert "block 99 does not exist" in err


@pytest.mark.parametrize("argv, says", [
    (["--layers", "0-1,x9"], "bad --layers item 'x9'"),
    (["--layers", "3-1"], "a range runs from low to high"),
    (["--ppl-seq-len", "1"], "--ppl-seq-len 1: a perplexity window needs at least 2 tokens"),
])
def test_cli_bad_layers_or_window_is_one_line_before_loading(argv, says, monkeypatch, cli_error):
    monkeypatch.setattr(sp, "load", lambda *a, **k: pytest.fail("loaded a model before checking the flags"))
    assert says in cli_error(lambda: sp.main(argv))


def test_cli_out_over_a_packed_checkpoint_leaves_only_the_new_model(tmp_path, data_dir, capsys):
    """--overwrite of a kernels24.pack folder: its packed.safetensors goes, it would be a second model there."""
    ck = tiny_ckpt(tmp_path, data_dir)
    sp.main(["--ckpt", str(ck), "--method", "magnitude", "--no-eval", "--device", "cpu", "--out", str(tmp_path / "24"),
             "--data-dir", str(data_dir)])
    pack.main(["--ckpt", str(tmp_path / "24"), "--out", str(tmp_path / "packed")])
    assert (tmp_path / "packed" / PACKED_FILE).exists() and not (tmp_path / "packed" / "model.safetensors").exists()
    sp.main(["--ckpt", str(ck), "--method", "magnitude", "--sparsity", "4:8", "--no-eval", "--device", "cpu",
             "--out", str(tmp_path / "packed"), "--overwrite", "--data-dir", str(data_dir)])
    assert not (tmp_path / "packed" / PACKED_FILE).exists()
    model = checkpoint.load(tmp_path / "packed", tokenizer=False)[0]
    assert sp.check_nm(model.layers[0].attention.wq.weight, 4, 8)
    assert not sp.check_nm(model.layers[0].attention.wq.weight, 2, 4)


@pytest.mark.parametrize("out", ["/proc/x", "afile/sub"])
def test_cli_out_that_cannot_be_written_is_one_line_before_loading(out, tmp_path, data_dir, monkeypatch, cli_error):
    """cli.check_output_dir creates and tests --out at the start: /proc can't hold a folder, afile is a file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    monkeypatch.setattr(sp, "load", lambda *a, **k: pytest.fail("loaded a model before checking --out"))
    err = cli_error(lambda: sp.main(["--out", out, "--method", "magnitude", "--no-eval", "--data-dir", str(data_dir)]))
    assert out.strip("/").split("/")[0] in err and (tmp_path / "afile").read_text() == "keep me"
