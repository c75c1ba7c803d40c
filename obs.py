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
  groups). Here the mask is fixed (a 2:4 weight): pruned entries are held at exactly 0 (their OBS error
  propagates like SparseGPT's); or, with row_hessians (ours, off by default), each row is walked on the
  Hessian of its own kept inputs alone: the exact updates for a fixed mask (the per-row Hessians that
  SparseGPT §3 approximates with one). The grid is packed.py's (fp16 min and scale per group), so the
  result packs into the same format.
Pruning and quantizing in one walk (the official SparseGPT's joint mode) is not offered: its grid would
be computed before the group's mask exists.
"""
import torch

from cli import UserError
from packed import grid4, snap4


def hessian_factor(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float, name: str | None, method: str,
                   slots: torch.Tensor | None = None):
    """(W fp32 with dead inputs zeroed, U = upper Cholesky factor of the damped H^-1).

    slots (rows, k): each row's own inputs; then W is (rows, k), row r's W[r, slots[r]], and U is (rows, k, k),
    the factor of row r's own Hessian H[slots[r], slots[r]] (same damping as the whole H's)."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights can go for free
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    if slots is not None:
        W, H = W.gather(1, slots), H[slots.unsqueeze(2), slots.unsqueeze(1)]
    eye = torch.eye(H.shape[-1], device=H.device)
    for attempt in range(4):  # H is PSD; rarely the damping is too small for fp32 Cholesky
        L, info = torch.linalg.cholesky_ex(H + (damp * 10 ** attempt) * eye)
        if not info.any():
            Hinv = torch.cholesky_inverse(L)
            Hinv, info = torch.linalg.cholesky_ex(Hinv, upper=True)  # upper factor of H^-1 (Eq. 5 note)
            if not info.any():
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
        # walk column -> group: one order for all rows (a list), or each row's own (order (rows, cols): a tensor)
        self.group_of = (None if order is None else (order // group_cols).tolist() if order.dim() == 1
                         else (order // group_cols).T.contiguous())

    def fit(self, g: int, values: torch.Tensor) -> None:
        """Group g's grid from values: the current weights of its columns (at least to the group's end)."""
        keep = self.keep[:, g * self.group_cols:(g + 1) * self.group_cols]
        values = values[:, :keep.shape[1]]
        lo = values.masked_fill(~keep, float("inf")).amin(1)
        hi = values.masked_fill(~keep, float("-inf")).amax(1)
        empty = ~keep.any(1)  # a row with nothing kept in this group: any grid will do
        lo[empty], hi[empty] = 0.0, 0.0
        self.scales[:, g], self.mins[:, g] = grid4(lo, hi)

    def use(self, g: "int | torch.Tensor") -> None:
        """Quantize to group g's grid; g: a group, or each row's group ((rows,) tensor)."""
        if isinstance(g, int):
            self._s, self._m = self.scales[:, g].float(), self.mins[:, g].float()
        else:
            self._s, self._m = (t.gather(1, g.unsqueeze(1)).squeeze(1).float() for t in (self.scales, self.mins))

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
    per_row = Hinv.dim() == 3  # each row its own factor (rows, cols, cols): only to quantize, nothing pruned
    if per_row and (quantizer is None or pruned is not None):
        raise ValueError("per-row factors are for quantizing every entry of W (the kept ones, gathered)")
    dynamic = quantizer is not None and quantizer.group_of is None  # grids fitted on the way
    if dynamic and quantizer.group_cols % blocksize and blocksize % quantizer.group_cols:
        raise ValueError(f"quantizer groups of {quantizer.group_cols} columns straddle blocks of {blocksize}")
    out = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        ErrT = torch.zeros(i2 - i1, rows, device=W.device)  # transposed: each column's error is contiguous
        Hinv1 = Hinv[..., i1:i2, i1:i2]
        d = Hinv1.diagonal(dim1=-2, dim2=-1)  # (block,), or (rows, block) per row
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
                torch.div(W1[:, i] - q, d[..., i], out=ErrT[i])
            if per_row:
                W1[:, i:].addcmul_(ErrT[i].unsqueeze(1), Hinv1[:, i, i:], value=-1)
            else:
                W1[:, i:].addr_(ErrT[i], Hinv1[i, i:], alpha=-1)  # OBS update of the rest of the block
            if quantizer is not None:
                W1[:, i] = q  # exactly on the grid (the update leaves it there only to rounding)
        W[:, i1:i2] = W1  # pruned columns are ~0 here, exactly 0 below; kept ones got err = 0 (or q)
        out[:, i1:i2] = mask1
        if per_row:  # the block's error, to all later columns at once
            W[:, i2:] -= torch.bmm(ErrT.T.unsqueeze(1), Hinv[:, i1:i2, i2:]).squeeze(1)
        else:
            W[:, i2:] -= ErrT.T @ Hinv[i1:i2, i2:]
    return out


class _Fp32Math:
    """fp32 with TF32 off, and one CPU thread: ~10 tiny ops a column, thread hand-offs cost more than the
    math (15x on 2 busy cores). one_thread=False: for the per-row Hessians' batched factorizations."""

    def __init__(self, device, one_thread: bool = True):
        self.cpu = device.type == "cpu" and one_thread

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
         act_order: bool = False, row_hessians: bool = False) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """GPTQ (Frantar et al. 2022, Alg. 1) of the kept entries of a pruned weight, 4-bit asymmetric, one grid
    per row and run of group_cols inputs (packed.py's: 256 inputs = 128 kept of 2:4).

    keep: bool (out, in), True = quantized; the others end exactly 0. act_order: walk the columns by
    decreasing H_jj (the official `--act-order`), every grid fitted before the walk. row_hessians: each row
    on the Hessian of its own kept inputs (_gptq_per_row; keep must be 2:4).
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
    if row_hessians:
        return _gptq_per_row(weight, hessian, keep, group_cols, blocksize, percdamp, name, act_order)
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


ROW_CHUNK_BYTES = 2 ** 28  # per-row Hessians are made for this many bytes of rows at a time


def _gptq_per_row(weight, hessian, keep, group_cols, blocksize, percdamp, name, act_order):
    """gptq(row_hessians=True): row r's kept entries walked on H[K_r, K_r], the Hessian of its own kept
    inputs. With the mask fixed, row r's output error is d^T H_KK d over its kept entries d alone, and each
    OBS update here is exact for that problem (SparseGPT §3, "Different Row-Hessian Challenge": one shared
    H^-1 only approximates it; there a pruned entry takes its share of each update, then is zeroed and its
    error goes only to later columns). Cost: a Cholesky of (cols/2)^2 per row, not one per layer.
    Kept slot s of every row lies in group of 4 number s // 2, so a run of group_cols inputs is a run of
    group_cols / 2 slots, the same for every row: grids and blocks are made in slot space."""
    rows, cols = weight.shape
    if cols % 4 or group_cols % 4 or (keep.view(rows, -1, 4).sum(2) != 2).any():
        raise UserError(f"{name or 'layer'}: per-row Hessians need exactly 2 kept of every 4 inputs and "
                        f"groups of whole 4s (group_cols {group_cols})")
    slots = keep.nonzero()[:, 1].view(rows, cols // 2)  # ascending in each row
    order = None  # act-order: each row's kept inputs by decreasing H_jj (the shared walk's order, restricted)
    if act_order:
        order = torch.argsort(torch.diag(hessian).float()[slots], dim=1, descending=True, stable=True)
    W = torch.zeros(rows, cols, device=weight.device)
    scales, mins = [], []
    chunk = max(1, ROW_CHUNK_BYTES // (4 * (cols // 2) ** 2))
    for r in range(0, rows, chunk):
        walked = slots[r:r + chunk] if order is None else slots[r:r + chunk].gather(1, order[r:r + chunk])
        with _Fp32Math(weight.device, one_thread=False):  # the cost: Cholesky of chunk x (cols/2)^2, batched
            Wk, Hinv = hessian_factor(weight[r:r + chunk], hessian, percdamp, name, "GPTQ", walked)
        with _Fp32Math(weight.device):
            keep_all = torch.ones_like(Wk, dtype=torch.bool)
            quantizer = Grid4(keep_all, group_cols // 2, None if order is None else order[r:r + chunk])
            if order is not None:  # static groups: every grid from the untouched kept values, in slot order
                original = Wk.gather(1, torch.argsort(order[r:r + chunk], dim=1))
                for g in range(quantizer.scales.shape[1]):
                    quantizer.fit(g, original[:, g * quantizer.group_cols:])
            walk(Wk, Hinv, max(1, blocksize // 2), quantizer=quantizer)
            W[r:r + chunk].scatter_(1, walked, Wk)
            scales.append(quantizer.scales)
            mins.append(quantizer.mins)
    return W, torch.cat(scales), torch.cat(mins)
