"""kernels24/sparse.py: which linears convert and why not (CPU), refusals of CPUs and old GPUs (CPU), and the
sparse tensor-core results against dense (GPU, compute capability >= 8.0; skipped here without one)."""
import pytest
import torch
import torch.nn.functional as F

import sparsity
from cli import UserError
from kernels24 import bench, sparse
from kernels24.bench import LINEAR_SHAPES
from model import ModelArgs, Transformer


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=64)
    return Transformer(ModelArgs(**{**args, **overrides})).eval()


# ----------------------------------------------------------------------------- checks that run on CPU

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
    sparsity.prune(m, "magnitude", (2, 4))
    plan = {name: problem for name, _, problem in sparse.plan(m, "cutlass")}
    assert plan["output"] == "not 2:4 sparse"
    assert plan["layers.0.attention.wq"] is None and plan["layers.1.feed_forward.w3"] is None
    assert "is not a multiple of cutlass's (32, 64)" in plan["layers.0.feed_forward.w2"]  # (64, 96)
    assert sparsity.check_nm(m.layers[0].attention.wq.weight, 2, 4) and not sparsity.check_nm(m.output.weight, 2, 4)
    with torch.no_grad():  # one group of 4 with 3 nonzeros is enough to keep a layer dense
        m.layers[1].attention.wk.weight[5, 8:12] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    plan = {name: problem for name, _, problem in sparse.plan(m, "cutlass")}
    assert plan["layers.1.attention.wk"] == "not 2:4 sparse" and plan["layers.1.attention.wq"] is None


# ----------------------------------------------------------------------------- GPU numbers

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
    torch.manual_seed(0)
    for shapes in LINEAR_SHAPES.values():
        for out, n_in in shapes.values():
            w = torch.randn(out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02
            w = w * sparsity.nm_mask(w.abs().float(), 2, 4)
            ws = bench.sparse_weight(w, backend)
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
    sparsity.prune(m, "magnitude", (2, 4))
    x = torch.randint(512, (2, 24), device="cuda")
    with torch.no_grad():
        ref = m(x)
    lines = []
    done = sparse.to_sparse(m, backend=backend, log=lines.append)
    assert len(done) == 2 * 7 and lines == ["kernels24.sparse: output stays dense: not 2:4 sparse"]
    assert isinstance(m.layers[0].attention.wq.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        got = m(x)
        assert (got - ref).norm() / ref.norm() < 1e-2
        m.setup_cache(1, 16)  # decode path: one token at a time through the KV cache
        m(x[:1, :8], start_pos=0)
        assert torch.isfinite(m(x[:1, 8:9], start_pos=8)).all()
