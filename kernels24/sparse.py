"""
Run the 2:4 linears of a model on sparse tensor cores (CUDA, compute capability >= 8.0, fp16/bf16).

    model, tok = checkpoint.load(ckpt, device="cuda", dtype=torch.bfloat16)
    kernels24.sparse.to_sparse(model, backend="cutlass")   # or "cusparselt"

Every nn.Linear whose weight is 2:4 sparse (at most 2 nonzeros in each group of 4 consecutive inputs) gets
weight = SparseSemiStructuredTensorCUTLASS/CUSPARSELT.from_dense(weight); F.linear then dispatches to CUTLASS
(torch._sparse_semi_structured_mm) or cuSPARSELt (torch._cslt_sparse_mm). A layer that cannot be converted
(not 2:4, unsupported dtype, shape not a multiple of the backend's minimum tile) stays dense with one
printed line saying why. Inference only: the sparse weights take no gradients.
torch's rules (torch/sparse/semi_structured.py): the weight must be 2-D, contiguous, on CUDA, with
rows/cols >= and multiples of (32, 64) for CUTLASS fp16/bf16 and (16, 16) for cuSPARSELt; the dense input
is padded to a multiple of 8 rows by torch, and must be contiguous (F.linear views it as 2-D), so each
converted layer gets a pre-hook that makes its input contiguous.
"""
import torch
import torch.nn as nn
from torch.sparse import SparseSemiStructuredTensor
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

from cli import UserError
from sparsity import check_nm

BACKENDS = {"cutlass": SparseSemiStructuredTensorCUTLASS, "cusparselt": SparseSemiStructuredTensorCUSPARSELT}
DTYPES = (torch.float16, torch.bfloat16)  # 2:4 on tensor cores; fp32 would be 1:2 under CUTLASS


def shape_problem(shape, dtype: torch.dtype, backend: str) -> str | None:
    """Why a weight of this shape/dtype can't use this backend, or None when it can."""
    if dtype not in DTYPES:
        return f"dtype {str(dtype).removeprefix('torch.')} (2:4 kernels need float16 or bfloat16)"
    if len(shape) != 2:
        return f"shape {tuple(shape)} is not 2-D"
    c = BACKENDS[backend]._DTYPE_SHAPE_CONSTRAINTS[dtype]
    rows, cols = shape
    if rows < c.sparse_min_rows or rows % c.sparse_min_rows or cols < c.sparse_min_cols or cols % c.sparse_min_cols:
        return f"shape {tuple(shape)} is not a multiple of {backend}'s ({c.sparse_min_rows}, {c.sparse_min_cols})"
    return None


def check_gpu(device: torch.device, backend: str, capability: tuple[int, int] | None = None) -> None:
    """UserError unless `device` is a CUDA GPU with compute capability >= 8.0 and the backend is usable there."""
    if backend not in BACKENDS:
        raise UserError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if device.type != "cuda":
        raise UserError(f"2:4 sparse kernels need a CUDA GPU (compute capability >= 8.0) and the model is on "
                        f"{device.type}; load it with device='cuda', or use kernels24.pack for compressed storage")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < (8, 0):
        raise UserError(f"2:4 sparse tensor cores need compute capability >= 8.0 (Ampere or newer); this GPU "
                        f"has {capability[0]}.{capability[1]}; run the model dense")
    if backend == "cusparselt":
        if not torch.backends.cusparselt.is_available():
            raise UserError("this torch build has no cuSPARSELt; use backend 'cutlass'")
        version = torch.backends.cusparselt.version()
        if tuple(capability) >= (9, 0) and version is not None and version < 600:
            raise UserError(f"cuSPARSELt {version} fails on compute capability {capability[0]}.{capability[1]} "
                            "(needs >= 0.6); use backend 'cutlass' or a newer torch")


def _contiguous_input(module, args):
    return (args[0].contiguous(),) + tuple(args[1:])


def plan(model: nn.Module, backend: str) -> list[tuple[str, nn.Linear, str | None]]:
    """(name, module, why it stays dense or None) for every distinct nn.Linear; runs on any device."""
    rows, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        w = module.weight
        if isinstance(w, SparseSemiStructuredTensor):
            continue
        # 2:4: at most 2 nonzeros in every group of 4 consecutive inputs of a row
        problem = shape_problem(w.shape, w.dtype, backend) or (
            None if w.ndim == 2 and check_nm(w, 2, 4) else "not 2:4 sparse")
        if problem is None and module.bias is not None and module.bias.dtype != w.dtype:
            problem = "bias dtype differs from weight dtype"
        rows.append((name, module, problem))
    return rows


def to_sparse(model: nn.Module, backend: str = "cutlass", log=print) -> list[str]:
    """Swap every 2:4 nn.Linear weight of `model` (in place) to a semi-structured sparse tensor.
    Returns the names of the converted modules."""
    check_gpu(next(model.parameters()).device, backend)
    done = []
    for name, module, problem in plan(model, backend):
        if problem:
            log(f"kernels24.sparse: {name} stays dense: {problem}")
            continue
        w = module.weight.detach().contiguous()
        # the backend's own constructor: to_sparse_semi_structured would read a global switch instead
        module.weight = nn.Parameter(BACKENDS[backend].from_dense(w), requires_grad=False)
        if getattr(module, "_contiguous_input_hook", None) is None:  # once, even if converted again later
            module._contiguous_input_hook = module.register_forward_pre_hook(_contiguous_input)
        done.append(name)
    return done
