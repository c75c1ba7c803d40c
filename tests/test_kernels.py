"""kernels/: packed 2:4 storage (CPU), the sparse-kernel swap's checks (CPU) and its numbers (GPU, skipped here)."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import checkpoint
import model as model_py
from kernels import bench, pack, sparse
from kernels.bench import LINEAR_SHAPES, magnitude_2to4, prune_2to4_
from model import ModelArgs, Transformer, UserError

def random_2to4(out, n_in, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g).to(dtype)
    return w * magnitude_2to4(w)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=64)
    return Transformer(ModelArgs(**{**args, **overrides})).eval()


class ByteTokenizer:
    """Just enough of the tokenizer interface for checkpoint.save (the pack CLI copies its files)."""
    def save(self, out_dir):
        (Path(out_dir) / "tokenizer_stub.txt").write_text("bytes")


def cli_exit(main, capsys) -> str:
    """What `python -m ...` does with this main: exit status 1 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as e:
        model_py.cli_main(main)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    return err


# ----------------------------------------------------------------------------- pack: bits and one weight

def test_pack_bits_layout_and_roundtrip():
    # first value in the low bits: [1, 2, 3, 0] -> 0b00_11_10_01
    assert pack.pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack.pack_bits(torch.tensor([5, 12]), 4).tolist() == [12 << 4 | 5]
    for bits in (2, 4):
        for n in (1, 3, 4, 5, 1001):  # lengths that are not a multiple of the values per byte
            x = torch.randint(0, 2 ** bits, (n,))
            packed = pack.pack_bits(x, bits)
            assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
            assert torch.equal(pack.unpack_bits(packed, bits, n), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_exact(dtype):
    w = random_2to4(48, 40, dtype)  # 48 * 20 kept values: positions fill 240 bytes
    w[0] = 0  # groups with fewer than 2 nonzeros: padded with zero-valued positions
    w[1, 1:4] = 0
    w[2, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])
    for mask in (None, magnitude_2to4(w.float() + 1e-3 * (w == 0))):  # a mask may keep a weight that is 0
        values, positions = pack.pack_weight(w, pack.check_2to4("w", w, mask))
        assert values.shape == (48, 20) and values.dtype == dtype and positions.numel() == 48 * 20 // 4
        back = pack.unpack_weight(values, positions, w.shape)
        assert back.dtype == dtype and torch.equal(back, w)
    odd = random_2to4(3, 12, dtype)  # 18 kept values: the last position byte is partly padding
    values, positions = pack.pack_weight(odd, pack.check_2to4("odd", odd))
    assert positions.numel() == 5 and torch.equal(pack.unpack_weight(values, positions, odd.shape), odd)


def test_non_2to4_weight_is_refused_with_its_name():
    dense = torch.randn(8, 16)
    with pytest.raises(UserError, match=r"layers\.3\.feed_forward\.w2\.weight: not 2:4"):
        pack.pack_state_dict({"layers.3.feed_forward.w2.weight": dense}, ["layers.3.feed_forward.w2.weight"])
    with pytest.raises(UserError, match=r"wq\.weight: shape \(8, 10\)"):
        pack.check_2to4("wq.weight", torch.zeros(8, 10))
    w = random_2to4(8, 16)
    wrong_mask = ~magnitude_2to4(w)  # keeps exactly the zeros
    with pytest.raises(UserError, match="nonzeros outside its mask"):
        pack.check_2to4("wk.weight", w, wrong_mask)


def test_quantize4_error_bound():
    """Every kept value is within scale/2 of its 4-bit reconstruction (min rounded down, scale up, to fp16);
    the only slack allowed is the float32 rounding of min + q * scale."""
    g = torch.Generator().manual_seed(1)
    values = torch.randn(7, 300, generator=g) * torch.logspace(-4, 1, 7).unsqueeze(1)  # 300 = 2 x 128 + 44
    values[0, :128] = 0.37  # a constant group: scale 0 or tiny, still within bound
    values[1, 5] = 40.0  # an outlier widens only its own group
    codes, scales, mins = pack.quantize4(values, 128)
    assert codes.numel() == 7 * 300 // 2 and scales.shape == mins.shape == (7, 3)
    assert scales.dtype == mins.dtype == torch.float16
    back = pack.dequantize4(codes, scales, mins, values.shape, 128)
    s = scales.float().repeat_interleave(128, dim=1)[:, :300]
    err = (back - values).abs()
    assert (err <= 0.5 * s + 2 ** -20 * values.abs()).all()
    assert err[0, :128].max() <= 1e-4  # constant group
    assert err.max() > 0  # it is a lossy code, and the test would notice a no-op


# ----------------------------------------------------------------------------- pack: checkpoints

def make_2to4_checkpoint(tmp_path, m, tok=None):
    masks = prune_2to4_(m)
    checkpoint.save(m, tok or ByteTokenizer(), tmp_path / "ckpt", masks=masks)
    return tmp_path / "ckpt", masks


def check_file_arithmetic(path: Path, report: dict, bits: int, value_bytes: int, group_size: int = 128):
    """The file is exactly header + packed parts + dense tensors, and the packed parts match the formula."""
    tensors, layout = pack.read_packed(path)
    sizes = pack.expected_bytes(layout, tensors)
    assert path.stat().st_size == pack.header_bytes(path) + sizes["packed"] + sizes["dense"]
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == sizes["packed"] + sizes["dense"]
    expected = 0
    for e in layout.values():
        out, n_in = e["shape"]
        kept = out * n_in // 2
        expected += kept // 4  # 2-bit positions (kept is a multiple of 4 for these shapes)
        expected += kept * value_bytes if bits == 0 else kept // 2 + out * -(-(n_in // 2) // group_size) * 4
    assert sizes["packed"] == expected == report["packed_bytes"]
    return tensors, layout


@pytest.mark.parametrize("tie", [False, True])
def test_pack_checkpoint_roundtrip_tiny(tmp_path, tie):
    m = tiny_model(tie_embeddings=tie)
    ckpt, masks = make_2to4_checkpoint(tmp_path, m)
    report = pack.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "packed")])
    out = tmp_path / "packed"
    assert (out / "packed.safetensors").exists() and not (out / "model.safetensors").exists()
    assert (out / "params.json").exists() and (out / "tokenizer_stub.txt").exists()
    with safe_open(str(out / "packed.safetensors"), framework="pt") as f:
        meta = f.metadata()
    layout = json.loads(meta["layout"])
    assert meta["format"] == pack.FORMAT and set(layout) == {k + ".weight" for k in masks}
    assert layout["layers.0.attention.wk.weight"] == {"shape": [32, 64], "dtype": "float32"}
    check_file_arithmetic(out / "packed.safetensors", report, 0, 4)
    assert report["n_packed_weights"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128)
    m2, _ = model_py.load(out, tokenizer=False)
    assert m2.output.weight is m2.tok_embeddings.weight if tie else True
    x = torch.randint(256, (2, 17))
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))  # exact: same weights, bit for bit


def test_pack_checkpoint_4bit_tiny(tmp_path):
    m = tiny_model()
    ckpt, masks = make_2to4_checkpoint(tmp_path, m)
    out = tmp_path / "packed4"
    report = pack.main(["--ckpt", str(ckpt), "--out", str(out), "--bits", "4", "--group-size", "32"])
    tensors, layout = check_file_arithmetic(out / "packed.safetensors", report, 4, 0, group_size=32)
    state = pack.load_packed_state_dict(out / "packed.safetensors")
    for name, e in layout.items():
        w, w4 = m.state_dict()[name], state[name]
        keep = masks[name.removesuffix(".weight")]
        assert (w4[~keep] == 0).all()  # pruned entries stay exactly zero
        scale = tensors[name + ".scales"].float().repeat_interleave(32, dim=1)  # 32 kept = 64 inputs per group
        err = (w4 - w)[keep].view(w.shape[0], -1)
        assert (err.abs() <= 0.5 * scale + 2 ** -20 * w[keep].view_as(err).abs()).all()
    m4, _ = model_py.load(out, tokenizer=False)
    x = torch.randint(256, (1, 16))
    with torch.no_grad():
        ref, got = m(x), m4(x)
    # weight errors are ~9% (relative) at 4 bits; the logits moved 6.0% when measured: a guard, not a bound
    assert 0 < (got - ref).norm() / ref.norm() < 0.15


def test_pack_cli_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="no model.safetensors"):
        pack.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "o")])
    m = tiny_model()
    checkpoint.save(m, ByteTokenizer(), tmp_path / "dense")  # dense projections, no masks
    with pytest.raises(UserError, match=r"layers\.0\.attention\.w[qkvo]\.weight: not 2:4 sparse"):
        pack.main(["--ckpt", str(tmp_path / "dense"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="not a packed 2:4 file"):
        pack.load_packed_state_dict(tmp_path / "dense" / "model.safetensors")
    argv = ["--ckpt", str(tmp_path / "dense"), "--out", str(tmp_path / "o")]
    assert cli_exit(lambda: pack.main(argv), capsys).startswith("error: layers.0.attention.w")


@pytest.mark.slow
def test_pack_real_smollm2(tmp_path, smollm2):
    """The measured case (bench/pack_smollm2.py prints the same numbers): a magnitude-2:4 SmolLM2-135M."""
    model, tok = smollm2
    m = copy.deepcopy(model)
    ckpt, _ = make_2to4_checkpoint(tmp_path, m, tok)
    x = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is")])
    with torch.no_grad():
        ref = m(x)
    for bits, value_bytes in ((0, 4), (4, 0)):
        out = tmp_path / f"packed{bits}"
        report = pack.main(["--ckpt", str(ckpt), "--out", str(out), "--bits", str(bits)])
        check_file_arithmetic(out / "packed.safetensors", report, bits, value_bytes)
        assert report["n_packed_weights"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
        m2, _ = model_py.load(out)
        with torch.no_grad():
            got = m2(x)
        if bits == 0:
            assert torch.equal(got, ref)
            # 2.125 bytes/weight + the header (~72 KB over 106M weights)
            assert report["linear_compression_vs_fp32"] == pytest.approx(4 / 2.125, rel=1e-3)
        else:  # per-weight bound is tested above; this only guards against a broken layer (measured 0.41)
            assert (got - ref).norm() / ref.norm() < 0.6
            assert report["linear_compression_vs_fp32"] > 10


# ----------------------------------------------------------------------------- sparse: checks that run on CPU

def test_refuses_cpu_and_old_gpus():
    m = tiny_model().to(torch.bfloat16)
    with pytest.raises(UserError, match="need a CUDA GPU"):
        sparse.to_sparse(m)
    with pytest.raises(UserError, match="compute capability >= 8.0.*has 7.5"):
        sparse.check_gpu(torch.device("cuda"), "cutlass", capability=(7, 5))
    sparse.check_gpu(torch.device("cuda"), "cutlass", capability=(9, 0))  # passes: H100
    with pytest.raises(UserError, match="unknown"):
        sparse.check_gpu(torch.device("cuda"), "triton", capability=(9, 0))
    if not torch.backends.cusparselt.is_available():
        with pytest.raises(UserError, match="no cuSPARSELt"):
            sparse.check_gpu(torch.device("cuda"), "cusparselt", capability=(8, 0))


def test_shape_rules():
    for shapes in LINEAR_SHAPES.values():  # every benchmarked linear fits both backends in fp16 and bf16
        for shape in shapes.values():
            for backend in sparse.BACKENDS:
                assert sparse.shape_problem(shape, torch.bfloat16, backend) is None
                assert sparse.shape_problem(shape, torch.float16, backend) is None
    assert "(32, 64)" in sparse.shape_problem((48, 64), torch.bfloat16, "cutlass")
    assert sparse.shape_problem((48, 64), torch.bfloat16, "cusparselt") is None
    assert "(16, 16)" in sparse.shape_problem((64, 40), torch.bfloat16, "cusparselt")
    assert "float16 or bfloat16" in sparse.shape_problem((64, 64), torch.float32, "cutlass")


def test_plan_picks_2to4_linears():
    m = tiny_model(hidden_dim=96).to(torch.bfloat16)  # 96 rows: not a multiple of CUTLASS's 32 x 64 for w2
    prune_2to4_(m)
    plan = {name: problem for name, _, problem in sparse.plan(m, "cutlass")}
    assert plan["output"] == "not 2:4 sparse"
    assert plan["layers.0.attention.wq"] is None and plan["layers.1.feed_forward.w3"] is None
    assert "is not a multiple of cutlass's (32, 64)" in plan["layers.0.feed_forward.w2"]  # (64, 96)
    assert sparse.is_2to4(m.layers[0].attention.wq.weight) and not sparse.is_2to4(m.output.weight)


def test_bench_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "needs a CUDA GPU" in cli_exit(lambda: bench.main([]), capsys)


# ----------------------------------------------------------------------------- sparse: GPU numbers

def usable(backend):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        sparse.check_gpu(torch.device("cuda"), backend)
        return True
    except UserError:
        return False


@pytest.mark.parametrize("backend", list(sparse.BACKENDS))
def test_sparse_linear_matches_dense_gpu(backend):
    if not usable(backend):
        pytest.skip(f"needs a CUDA GPU (compute capability >= 8.0) with {backend}")
    from kernels.bench import sparse_weight
    torch.manual_seed(0)
    for shapes in LINEAR_SHAPES.values():
        for out, n_in in shapes.values():
            w = torch.randn(out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02
            w = w * magnitude_2to4(w)
            ws = sparse_weight(w, backend)
            for n in (1, 16, 128, 1000):  # 1 and 1000 need torch's row padding to a multiple of 8
                x = torch.randn(n, n_in, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x.float(), w.float())
                err = (F.linear(x, ws).float() - ref).norm() / ref.norm()
                assert err < 1e-2, (backend, out, n_in, n, float(err))


@pytest.mark.parametrize("backend", list(sparse.BACKENDS))
def test_to_sparse_model_matches_dense_gpu(backend):
    if not usable(backend):
        pytest.skip(f"needs a CUDA GPU (compute capability >= 8.0) with {backend}")
    m = tiny_model(dim=128, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=512).to("cuda", torch.bfloat16)
    prune_2to4_(m)
    x = torch.randint(512, (2, 24), device="cuda")
    with torch.no_grad():
        ref = m(x)
    lines = []
    done = sparse.to_sparse(m, backend=backend, log=lines.append)
    assert len(done) == 2 * 7 and lines == ["kernels.sparse: output stays dense: not 2:4 sparse"]
    assert isinstance(m.layers[0].attention.wq.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        got = m(x)
        assert (got - ref).norm() / ref.norm() < 1e-2
        m.setup_cache(1, 16)  # decode path: one token at a time through the KV cache
        m(x[:1, :8], start_pos=0)
        assert torch.isfinite(m(x[:1, 8:9], start_pos=8)).all()
