"""
The column walk that SparseGPT and GPTQ share: one implementation of the Optimal Brain Surgeon update
(Hassibi & Stork 1993) in the blocked, Cholesky form of Frantar et al.

    W, mask = obs.sparsegpt(weight, H, (2, 4))                       # prune: choose the mask on the way
    W4, scales, mins = obs.gptq(weight, H, keep, group_cols=256)     # quantize the kept entries to 4 bits

H = (2/n) sum_t x_t x_t^T is the layer's input Hessian over the calibration tokens. Both methods:
- dead inputs (H_jj = 0): H_jj = 1 and their weights 0; damping: percdamp * mean(diag H) on the diagonal;
- take U, the upper Cholesky factor of H^-1 (cholesky_inverse, then cholesky(upper=True));
- walk the columns in blocks: each column j is replaced by its target q_j (0 where pruned, its 4-bit grid
  point where quantized, itself where kept exactly); err_j = (w_j - q_j) / U_jj goes to the rest of the
  block at once (W[:, j:] -= err_j U[j, j:]) and the block's errors to the later columns in one matmul.

- SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", §3, Alg. 1; github.com/IST-DASLab/sparsegpt): the mask is chosen by w^2 / U_jj^2, over the
  whole (rows x block) for unstructured sparsity, every M columns of each row for N:M (§3.3).
- GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers", §4, Alg. 1; github.com/IST-DASLab/gptq): columns in their order, the asymmetric 4-bit
  grid of a group computed when the walk reaches the group's first column, from the group's kept values
  as they are then (already corrected by the earlier columns); or, with act_order (the official
  --act-order), columns by decreasing H_jj and every grid made first from the untouched weight (static
  groups). Here the mask is fixed
  (a 2:4 weight): pruned entries are held at exactly 0 (their OBS error propagates like SparseGPT's) and
  the grid is packed.py's (fp16 min and scale per group), so the result packs into the same format.
Pruning and quantizing in one walk (the official SparseGPT's joint mode) is not offered: its grid would
be computed before the group's mask exists.
"""
import torch

from cli import UserError
from packed import grid4, snap4


def hessian_factor(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float, name: str | None, method: str):
    """(W fp32 with dead inputs zeroed, U = upper Cholesky factor of the damped H^-1)."""
    cols = weight.shape[1]
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights can go for free
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    for attempt in range(4):  # H is PSD; rarely the damping is too small for fp32 Cholesky
        L, info = torch.linalg.cholesky_ex(H + (damp * 10 ** attempt) * torch.eye(cols, device=H.device))
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            Hinv, info = torch.linalg.cholesky_ex(Hinv, upper=True)  # upper factor of H^-1 (Eq. 5 note)
            if info == 0:
                return W, Hinv
    raise UserError(f"{name or 'layer'}: {method}'s Hessian is not positive definite even with "
                    f"{percdamp * 1000:g}x damping; use more calibration data (--nsamples)")


class Grid4:
    """GPTQ's quantizer in packed.py's format: per row, one asymmetric 4-bit grid for each run of
    `group_cols` inputs, from the min and max of the run's kept entries (keep). Dynamic (default): a group
    is fitted when the walk reaches it. `order` (act-order): the walk's column j is the weight's column
    order[j], and every group is fitted before the walk (AutoGPTQ's static groups)."""

    def __init__(self, keep: torch.Tensor, group_cols: int, order: torch.Tensor | None = None):
        rows, cols = keep.shape
        self.keep, self.group_cols = keep, group_cols
        n_groups = -(-cols // group_cols)
        self.scales = torch.zeros(rows, n_groups, dtype=torch.float16, device=keep.device)
        self.mins = torch.zeros_like(self.scales)
        self.group_of = None if order is None else (order // group_cols).tolist()  # walk column -> group

    def fit(self, g: int, values: torch.Tensor) -> None:
        """Group g's grid from values: the current weights of its columns (at least to the group's end)."""
        keep = self.keep[:, g * self.group_cols:(g + 1) * self.group_cols]
        values = values[:, :keep.shape[1]]
        lo = values.masked_fill(~keep, float("inf")).amin(1)
        hi = values.masked_fill(~keep, float("-inf")).amax(1)
        empty = ~keep.any(1)  # a row with nothing kept in this group: any grid will do
        lo[empty], hi[empty] = 0.0, 0.0
        self.scales[:, g], self.mins[:, g] = grid4(lo, hi)

    def use(self, g: int) -> None:
        self._s, self._m = self.scales[:, g].float(), self.mins[:, g].float()

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return snap4(w, self._s, self._m)[1]


@torch.no_grad()
def walk(W: torch.Tensor, Hinv: torch.Tensor, blocksize: int, sparsity=None, pruned: torch.Tensor | None = None,
         quantizer: Grid4 | None = None) -> torch.Tensor:
    """The blocked OBS column walk on W (fp32, changed in place); returns the pruned entries (bool).

    The pruned entries are chosen on the way (sparsity: a fraction or (n, m); SparseGPT) or given (pruned;
    GPTQ on a 2:4 weight). quantizer: every kept entry goes to its grid point (GPTQ); without one kept
    entries keep their (updated) values. Blocks batch the updates only: the result is the same for any
    blocksize, to fp32 rounding (an N:M group lies inside one block; a quantizer group starts a block or
    lies inside one, so its grid sees every update made before it).
    """
    rows, cols = W.shape
    nm = isinstance(sparsity, tuple)
    if quantizer is not None and sparsity is not None:
        raise ValueError("prune and quantize in one walk: a group's grid would precede its mask")
    dynamic = quantizer is not None and quantizer.group_of is None  # grids fitted on the way
    if dynamic and quantizer.group_cols % blocksize and blocksize % quantizer.group_cols:
        raise ValueError(f"quantizer groups of {quantizer.group_cols} columns straddle blocks of {blocksize}")
    out = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        ErrT = torch.zeros(i2 - i1, rows, device=W.device)  # transposed: each column's error is contiguous
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if pruned is not None:
            mask1 = pruned[:, i1:i2].clone()  # True = pruned
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if quantizer is None:
            if sparsity is not None and not nm:  # unstructured: choose over the whole rows x block
                score = W1 ** 2 / d.unsqueeze(0) ** 2
                k = int(score.numel() * sparsity)
                mask1.view(-1)[torch.sort(score.view(-1), stable=True).indices[:k]] = True
            scale = mask1 / d  # err = w / [H^-1]_jj where pruned, 0 where kept
        for i in range(i2 - i1):
            if nm and i % sparsity[1] == 0:  # N:M: decide the next group with updated W
                n, m = sparsity
                score = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                mask1.scatter_(1, i + torch.topk(score, m - n, dim=1, largest=False).indices, True)
                torch.div(mask1[:, i:i + m], d[i:i + m], out=scale[:, i:i + m])
            if quantizer is None:
                torch.mul(W1[:, i], scale[:, i], out=ErrT[i])
            else:
                if not dynamic:  # act-order: this column's group, fitted before the walk
                    quantizer.use(quantizer.group_of[i1 + i])
                elif (i1 + i) % quantizer.group_cols == 0:  # GPTQ: the group's grid from its current weights
                    end = i1 + i + quantizer.group_cols  # the group lies in this block or starts it
                    quantizer.fit((i1 + i) // quantizer.group_cols, torch.cat([W1[:, i:], W[:, i2:end]], dim=1))
                    quantizer.use((i1 + i) // quantizer.group_cols)
                q = quantizer(W1[:, i]).masked_fill_(mask1[:, i], 0.0)
                torch.div(W1[:, i] - q, d[i], out=ErrT[i])
            W1[:, i:].addr_(ErrT[i], Hinv1[i, i:], alpha=-1)  # OBS update of the rest of the block
            if quantizer is not None:
                W1[:, i] = q  # exactly on the grid (the update leaves it there only to rounding)
        W[:, i1:i2] = W1  # pruned columns are ~0 here, exactly 0 below; kept ones got err = 0 (or q)
        out[:, i1:i2] = mask1
        W[:, i2:] -= ErrT.T @ Hinv[i1:i2, i2:]  # the block's error, to all later columns at once
    return out


class _Fp32Math:
    """fp32 with TF32 off, and one CPU thread: ~10 tiny ops a column, thread hand-offs cost more than the
    math (15x on 2 busy cores)."""

    def __init__(self, device):
        self.cpu = device.type == "cpu"

    def __enter__(self):
        self.tf32, self.threads = torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads()
        torch.backends.cuda.matmul.allow_tf32 = False
        if self.cpu:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.set_num_threads(self.threads)


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity, blocksize: int = 128,
              percdamp: float = 0.01, name: str | None = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1): prune column by column and let the later columns
    absorb each pruned weight's error through the inverse Hessian (the OBS update).

    sparsity: (n, m) or a pruned fraction. Returns (new weight in weight.dtype, mask, True = kept).
    All math in fp32 with TF32 off, whatever the model dtype.
    """
    cols = weight.shape[1]
    if isinstance(sparsity, tuple):
        n, m = sparsity
        if cols % m:
            raise UserError(f"{name or 'layer'}: input dim {cols} is not a multiple of M={m}, so {n}:{m} "
                            f"sparsity cannot apply; leave this layer out with --layers or choose another M")
        blocksize = max(m, blocksize // m * m)  # an N:M group never straddles two blocks
    with _Fp32Math(weight.device):
        W, Hinv = hessian_factor(weight, hessian, percdamp, name, "SparseGPT")
        pruned = walk(W, Hinv, blocksize, sparsity=sparsity)
    W[pruned] = 0.0
    return W.to(weight.dtype), ~pruned


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, group_cols: int, blocksize: int = 128,
         percdamp: float = 0.01, name: str | None = None,
         act_order: bool = False) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """GPTQ (Frantar et al. 2022, Alg. 1) of the kept entries of a pruned weight, 4-bit asymmetric, one grid
    per row and run of group_cols inputs (packed.py's: 256 inputs = 128 kept of 2:4).

    keep: bool (out, in), True = quantized; the others end exactly 0. act_order: walk the columns by
    decreasing H_jj (the official `--act-order`), every grid fitted before the walk.
    Returns (weight in fp32, every kept entry exactly scales * q + mins in fp32 as packed.dequantize4
    computes it; scales, mins: fp16, (out, ceil(in / group_cols)), in the weight's column order).
    """
    rows, cols = weight.shape
    if keep.shape != weight.shape or keep.dtype != torch.bool:
        raise UserError(f"{name or 'layer'}: keep must be a bool mask of shape {tuple(weight.shape)}")
    if group_cols < 1:
        raise UserError(f"{name or 'layer'}: a quantization group needs at least one input, not {group_cols}")
    if group_cols % blocksize and blocksize % group_cols:  # a grid is made at a block start or inside a block
        blocksize = group_cols
    keep = keep.to(weight.device)
    with _Fp32Math(weight.device):
        if not act_order:
            W, Hinv = hessian_factor(weight, hessian, percdamp, name, "GPTQ")
            quantizer = Grid4(keep, group_cols)
            walk(W, Hinv, blocksize, pruned=~keep, quantizer=quantizer)
            return W, quantizer.scales, quantizer.mins
        order = torch.argsort(torch.diag(hessian).float(), descending=True, stable=True)
        W, Hinv = hessian_factor(weight[:, order], hessian[order][:, order], percdamp, name, "GPTQ")
        quantizer, back = Grid4(keep, group_cols, order=order), torch.argsort(order)
        original = W[:, back]  # dead inputs zeroed, as the walk sees them
        for g in range(quantizer.scales.shape[1]):
            quantizer.fit(g, original[:, g * group_cols:])
        walk(W, Hinv, blocksize, pruned=~keep[:, order], quantizer=quantizer)
    return W[:, back], quantizer.scales, quantizer.mins
