"""
One-shot pruning of the seven linear layers of every decoder block: magnitude, Wanda and SparseGPT,
unstructured (a ratio) or N:M semi-structured along the input dimension (2:4, 4:8, any N:M).

    python sparsity.py --ckpt smollm2-135m --method wanda --sparsity 2:4 --out out/wanda24
    python sparsity.py --method sparsegpt --sparsity 0.5 --nsamples 128 --ppl-windows 8   # 8 eval windows
    masks = sparsity.prune(model, "sparsegpt", "2:4", calib)   # from Python: {module name: bool mask}

- magnitude: score |W_ij|, the baseline both papers compare against;
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", §3, Eq. 1;
  github.com/locuslab/wanda): score |W_ij| * ||X_j||_2, compared per output row; no weight update;
- SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", §3, Alg. 1; github.com/IST-DASLab/sparsegpt): columns in blocks, the mask chosen by
  w^2 / [H^-1]_jj^2 (§3.2; N:M §3.3), each pruned weight's error absorbed by the later columns (OBS update);
  its column walk is obs.py's, shared with GPTQ.

Calibration is sequential, one decoder block at a time (as in the official code): the calibration windows
are run through block l, its layers are pruned, and the windows are run through the pruned block again to
become the inputs of block l+1 (calibrate_blocks, which kernels24.pack's GPTQ uses too); only one block's
activations live at once, so a 7B model calibrates on one GPU. Where the papers leave room we do as the
official code does:
- the seven layers of a block are scored on the same block inputs (GPTQ's "true sequential", stage by stage
  inside a block, is an option of calibrate_blocks that kernels24.pack's GPTQ uses);
- magnitude's unstructured masks compare the whole layer, Wanda's each output row, SparseGPT's each
  (rows x 128) column block; N:M groups are runs of M inputs in each row for all three;
- exact counts (a sort, not a `<= threshold`): dequantized 4-bit weights tie a lot;
- q,k,v (and w1,w3) read one tensor, so its statistics (Hessian / norms) are accumulated once.
Masks are torch.bool, True = weight kept.
"""
import time
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn

from checkpoint import load, save
from cli import (DTYPES, Device, DType, UserError, check_output_dir, cli_main, parse_config, peak_memory_gb,
                 reset_peak_memory, resolve_device)
from data import c4_paths, calibration_windows, resolve_data_dir
from eval import WikiText2, check_ppl_seq_len
from model import PROJECTIONS
from obs import sparsegpt

Method = Literal["magnitude", "wanda", "sparsegpt"]
METHODS = get_args(Method)
BATCH_TOKENS = 2048  # calibration tokens per block forward: one window of 2048, or 8 of 256


@dataclass
class Config:
    """One-shot pruning (magnitude, Wanda, SparseGPT) of a Llama's seven projections, N:M or unstructured."""
    ckpt: str = "smollm2-135m"  # model name or checkpoint path (checkpoint.load)
    method: Method = "wanda"  # pruning criterion
    sparsity: str = "2:4"  # N:M (2:4, 4:8) or a pruned fraction (0.5)
    out: str | None = None  # directory for the pruned checkpoint (weights with exact zeros + masks)
    overwrite: bool = False  # write into a --out that already holds files
    nsamples: int = 128  # calibration windows (Wanda, SparseGPT)
    calib_len: int = 2048  # tokens per calibration window
    ppl_seq_len: int = 2048  # WikiText-2 perplexity window length
    ppl_windows: int = 0  # evaluate only the first N perplexity windows (0: all)
    eval: bool = True  # measure dense and pruned WikiText-2 perplexity
    data_dir: str | None = None  # default ./data, then ../shared/data
    device: Device = "auto"  # auto: cuda when torch sees a GPU, else cpu
    dtype: DType = "float32"  # weight dtype (SparseGPT's math is fp32 anyway)
    layers: str | None = None  # restrict pruning, e.g. "0-3,10" or "w1,w2,w3"
    seed: int = 0  # calibration sampling seed
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT damping, fraction of mean(diag H)


# ----------------------------------------------------------------------------- patterns

def parse_sparsity(s) -> "tuple[int, int] | float":
    """'2:4' -> (2, 4) (keep 2 of every 4); '0.5' or '50%' -> 0.5 (fraction pruned)."""
    s = str(s).strip()
    try:
        if ":" in s:
            n, m = (int(v) for v in s.split(":"))
            if not 0 < n <= m:
                raise ValueError
            return (n, m)
        p = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        if not 0.0 <= p < 1.0:
            raise ValueError
        return p
    except ValueError:
        raise UserError(f"bad sparsity {s!r}: use N:M with 0 < N <= M (e.g. 2:4, 4:8) "
                        f"or a pruned fraction in [0, 1) (e.g. 0.5)") from None


def sparsity_str(sparsity) -> str:
    return f"{sparsity[0]}:{sparsity[1]}" if isinstance(sparsity, tuple) else f"{sparsity:g}"


# ----------------------------------------------------------------------------- which layers

SHORT = {p.split(".")[-1]: p for p in PROJECTIONS}  # wq -> attention.wq ... (the names --layers takes)


def parse_layers(layers_filter: str) -> "tuple[list[tuple[int, int]], set[str]]":
    """--layers "0-3,10,wq" -> ([(0, 3), (10, 10)], {"attention.wq"}): block ranges and projection names."""
    usage = f"use block indices/ranges (0-3,7) or projection names ({','.join(SHORT)})"
    blocks, projs = [], set()
    for item in layers_filter.replace(" ", "").split(","):
        if item in SHORT:
            projs.add(SHORT[item])
        elif item:
            try:
                lo, hi = (int(v) for v in item.split("-")) if "-" in item else (int(item), int(item))
            except ValueError:
                raise UserError(f"bad --layers item {item!r}: {usage}") from None
            if lo > hi:
                raise UserError(f"bad --layers item {item!r}: a range runs from low to high; {usage}")
            blocks.append((lo, hi))
    if not blocks and not projs:
        raise UserError(f"--layers {layers_filter!r} names no layer: {usage}")
    return blocks, projs


def prunable_linears(model: nn.Module, layers_filter: str | None = None) -> "dict[str, nn.Linear]":
    """The seven projections (model.PROJECTIONS) of every block, by module name (layers.0.attention.wq ...).
    layers_filter: comma-separated block indices or ranges and/or projection names, e.g. "0-3,10", "w1,w2,w3",
    "0-3,wq"; a layer is kept if it matches both kinds given. A block the model lacks is an error."""
    found = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)
             and name.startswith("layers.") and name.split(".", 2)[-1] in PROJECTIONS}
    if not layers_filter:
        return found
    ranges, projs = parse_layers(layers_filter)
    absent = min((max(lo, len(model.layers)) for lo, hi in ranges if hi >= len(model.layers)), default=None)
    if absent is not None:
        raise UserError(f"--layers {layers_filter!r}: block {absent} does not exist (the model has blocks "
                        f"0-{len(model.layers) - 1}); leave it out")
    blocks = {b for lo, hi in ranges for b in range(lo, hi + 1)}
    kept = {name: mod for name, mod in found.items() if (not blocks or int(name.split(".")[1]) in blocks)
            and (not projs or name.split(".", 2)[-1] in projs)}
    if not kept:
        raise UserError(f"--layers {layers_filter!r} selects no layer (the model has blocks "
                        f"0-{len(model.layers) - 1} and projections {','.join(SHORT)})")
    return kept


def check_fits(targets: "dict[str, nn.Linear]", sparsity) -> None:
    """Fail before any work if a layer's input dimension can't take N:M; the error names the layer."""
    if isinstance(sparsity, tuple):
        for name, lin in targets.items():
            if lin.in_features % sparsity[1]:
                nm_mask(lin.weight[:1], *sparsity, name=name)


# ----------------------------------------------------------------------------- masks and the three criteria

def nm_mask(score: torch.Tensor, n: int, m: int, name: str | None = None) -> torch.Tensor:
    """Keep the n largest scores in every run of m consecutive inputs (last dim) of each output row."""
    out_dim, in_dim = score.shape
    if in_dim % m:
        raise UserError(f"{name or 'layer'}: input dim {in_dim} is not a multiple of M={m}, so {n}:{m} "
                        f"sparsity cannot apply; leave this layer out with --layers or choose another M")
    groups = score.reshape(out_dim, in_dim // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=score.device).scatter_(-1, keep, True)
    return mask.reshape(out_dim, in_dim)


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune the int(sparsity * size) smallest scores of each output row (Wanda) or of the whole layer.

    Exact counts (sort, not a threshold): a threshold `score <= t` prunes every tie of t, and weights
    dequantized from 4-bit grids are full of ties.
    """
    flat = score if per_row else score.reshape(1, -1)
    k = int(flat.shape[1] * sparsity)
    order = torch.sort(flat, dim=-1, stable=True).indices[:, :k]
    mask = torch.ones(flat.shape, dtype=torch.bool, device=score.device).scatter_(-1, order, False)
    return mask.reshape(score.shape)


def magnitude_mask(weight: torch.Tensor, sparsity, name: str | None = None) -> torch.Tensor:
    """Score |W|; unstructured masks compare the whole layer, as the official magnitude baseline does."""
    score = weight.detach().abs().float()
    if isinstance(sparsity, tuple):
        return nm_mask(score, *sparsity, name=name)
    return unstructured_mask(score, sparsity, per_row=False)


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, sparsity, name: str | None = None) -> torch.Tensor:
    """Wanda score |W_ij| * ||X_j||_2 (sq_norm[j] = sum over calibration tokens of x_j^2), compared per row."""
    score = weight.detach().abs().float() * sq_norm.float().sqrt()
    if isinstance(sparsity, tuple):
        return nm_mask(score, *sparsity, name=name)
    return unstructured_mask(score, sparsity, per_row=True)


# ----------------------------------------------------------------------------- sequential pruning, block by block

@torch.no_grad()
def prune(model: nn.Module, method: str, sparsity, calib: torch.Tensor | None = None,
          layers: str | None = None, blocksize: int = 128, percdamp: float = 0.01,
          report: dict | None = None, log=print) -> "dict[str, torch.Tensor]":
    """Prune model in place; returns {module name: bool mask (True = kept)}.

    method: magnitude | wanda | sparsegpt. sparsity: (n, m) or a float (or a string for parse_sparsity).
    calib: LongTensor (nsamples, seq_len) of calibration windows (Wanda and SparseGPT).
    report: if a dict, filled with seconds spent in block forwards and in the method's own work.
    """
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}: choose one of {', '.join(METHODS)}")
    if isinstance(sparsity, str):
        sparsity = parse_sparsity(sparsity)
    targets = prunable_linears(model, layers)
    check_fits(targets, sparsity)
    t_start = time.perf_counter()
    if method == "magnitude":  # needs no data
        masks = {name: magnitude_mask(lin.weight, sparsity, name=name) for name, lin in targets.items()}
        for name, lin in targets.items():
            lin.weight.mul_(masks[name])
        if report is not None:
            t = time.perf_counter() - t_start
            report.update(forward_s=0.0, method_s=t, total_s=t)
        return masks

    def work(name, lin, stat):  # one layer, on its block's calibration statistics
        if method == "wanda":
            mask = wanda_mask(lin.weight, stat, sparsity, name=name)
            lin.weight.mul_(mask)
        else:
            new, mask = sparsegpt(lin.weight, stat, sparsity, blocksize=blocksize, percdamp=percdamp, name=name)
            lin.weight.copy_(new)
        return mask

    stat = "hessian" if method == "sparsegpt" else "sq_norm"
    return calibrate_blocks(model, calib, targets, stat, work, f"{method} {sparsity_str(sparsity)}", report, log)


@torch.no_grad()
def calibrate_blocks(model: nn.Module, calib: torch.Tensor | None, targets: "dict[str, nn.Linear]", stat: str,
                     work, label: str, report: dict | None = None, log=print, stages=None) -> dict:
    """Block by block, as the official SparseGPT/GPTQ code: run the windows through block l collecting each
    target layer's input statistics, call work(name, linear, statistic) on each of its layers (which changes
    the layer in place), then run the windows through the changed block: the inputs of block l+1.

    stat: "hessian" (H = (2/n) sum_t x_t x_t^T: SparseGPT, GPTQ) or "sq_norm" (sum_t x_j^2: Wanda).
    stages: None (all of a block's layers on one pass's statistics) or model.PROJECTION_STAGES (GPTQ's "true
    sequential": each stage's statistics from a pass through the block whose earlier stages are already changed).
    Returns {name: what work returned}; report (a dict) gets forward_s, method_s, total_s.
    """
    if calib is None or calib.numel() == 0:
        raise UserError(f"{label.split()[0]} needs calibration windows (calib)")
    t_start = time.perf_counter()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # Hessians are accumulated in true fp32 too
    try:
        results, fwd_s, work_s = _sequential(model, calib, targets, stat, work, label, log, stages)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if report is not None:
        report.update(forward_s=fwd_s, method_s=work_s, total_s=time.perf_counter() - t_start)
    return results


def _sequential(model, calib, targets, kind, work, label, log, stages):
    """Block by block: for each stage, a statistics pass and work on its layers; then the outputs pass.
    Returns (results, forward s, work s)."""
    device = next(model.parameters()).device
    results, fwd_s, work_s = {}, 0.0, 0.0
    t0 = time.perf_counter()
    hidden, rest = _block_inputs(model, calib)
    _sync(device)
    fwd_s += time.perf_counter() - t0
    last = max(int(name.split(".")[1]) for name in targets)
    batch = max(1, BATCH_TOKENS // hidden.shape[1])  # short windows go through a block several at a time
    for b in range(last + 1):
        block = model.layers[b]
        names = [name for name in targets if int(name.split(".")[1]) == b]
        groups = [names] if stages is None else [[n for n in names if n.split(".", 2)[2] in s] for s in stages]
        t_fwd = t_stats = t_work = 0.0
        for group in filter(None, groups):
            t = time.perf_counter()
            stats, hook_s = _input_statistics(block, hidden, rest, batch, {n: targets[n] for n in group}, kind)
            t_fwd += time.perf_counter() - t - hook_s
            t_stats += hook_s
            t = time.perf_counter()
            for name in group:
                results[name] = work(name, targets[name], stats[name])
            del stats
            _sync(device)
            t_work += time.perf_counter() - t
        t = time.perf_counter()
        if b < last:  # the changed block's outputs are the next block's inputs
            for i in range(0, hidden.shape[0], batch):
                hidden[i:i + batch] = _run_block(block, hidden[i:i + batch], rest)
            _sync(device)
        t_fwd += time.perf_counter() - t
        fwd_s += t_fwd
        work_s += t_stats + t_work
        log(f"block {b + 1}/{len(model.layers)}: {len(names)} layers {label} | forward {t_fwd:.1f}s, "
            f"{label.split()[0]} {t_stats + t_work:.1f}s (stats {t_stats:.1f}s, layers {t_work:.1f}s)", flush=True)
    return results, fwd_s, work_s


def _input_statistics(block, hidden, rest, batch, layers, kind):
    """Run the windows through block, accumulating each of layers' input statistics; a window stops once
    all of them have seen it. Returns ({name: statistic}, seconds spent in the hooks)."""
    # q,k,v (and w1,w3) read the same tensor: accumulate it once
    stats, owner, seen, fired, handles, hook_s = {}, {}, {}, set(), [], 0.0

    def hook(name):
        def f(module, args):
            nonlocal hook_s
            t = time.perf_counter()
            x = args[0]
            if name not in owner:
                owner[name] = seen.setdefault(id(x), (x, name))[1]
            if owner[name] == name:
                x = x.reshape(-1, x.shape[-1]).float()
                if name not in stats:
                    d = x.shape[1]
                    stats[name] = torch.zeros((d, d) if kind == "hessian" else d, device=x.device)
                if kind == "hessian":
                    add_gram_upper(stats[name], x)  # sum_t x x^T, upper triangle
                else:
                    stats[name].add_((x * x).sum(0))  # sum_t x_j^2
                _sync(x.device)
            hook_s += time.perf_counter() - t
            fired.add(name)
            if len(fired) == len(layers):  # the rest of the block computes nothing these layers need
                raise _Stop
        return f

    for name, lin in layers.items():
        handles.append(lin.register_forward_pre_hook(hook(name)))
    try:
        for i in range(0, hidden.shape[0], batch):
            fired.clear()
            try:
                _run_block(block, hidden[i:i + batch], rest)
            except _Stop:
                pass
            seen.clear()  # owners are decided on the first window; don't hold its tensors
    finally:
        for h in handles:
            h.remove()
    _sync(hidden.device)
    ntokens = hidden.shape[0] * hidden.shape[1]
    if kind == "hessian":  # mirror the upper triangle
        stats = {n: (g.triu() + g.triu(1).T) * (2.0 / ntokens) for n, g in stats.items()}
    return {name: stats[owner[name]] for name in layers}, hook_s


def add_gram_upper(gram: torch.Tensor, x: torch.Tensor, block: int = 192) -> None:
    """gram += xᵀx on and above the diagonal blocks only (x: tokens × d): the Gram matrix is symmetric, so
    this is ~0.6x the time of x.T @ x (the full product costs about as much as the block's forward)."""
    d = x.shape[1]
    for i in range(0, d, block):
        gram[i:i + block, i:].addmm_(x[:, i:i + block].T, x[:, i:])


class _Stop(Exception):
    pass


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block_inputs(model, calib):
    """Run the embeddings and catch what block 0 receives: its hidden states for every window, plus the
    other arguments (rotary tables, causal mask ...) that every block gets unchanged."""
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    hidden = None
    try:
        for i in range(calib.shape[0]):
            try:
                model(calib[i:i + 1].to(device))
            except _Stop:
                pass
            args, kwargs = captured.pop()
            if hidden is None:  # one buffer, overwritten block by block (outputs replace inputs)
                hidden = torch.empty((calib.shape[0],) + args[0].shape[1:], dtype=args[0].dtype, device=device)
                rest = (args[1:], kwargs)
            hidden[i] = args[0][0]
    finally:
        handle.remove()
    return hidden, rest


def _run_block(block, x, rest):
    out = block(x, *rest[0], **rest[1])
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------- checks

def check_nm(t: torch.Tensor, n: int, m: int) -> bool:
    """Every run of m consecutive entries along the last dim has at most n nonzeros."""
    if t.shape[-1] % m:
        return False
    return bool(((t != 0).reshape(-1, m).sum(-1) <= n).all())


def check_mask(mask: torch.Tensor, sparsity) -> bool:
    """mask is bool and has the pattern: exactly n kept of every m, or the pruned fraction to rounding."""
    if mask.dtype != torch.bool:
        return False
    if isinstance(sparsity, tuple):
        n, m = sparsity
        return mask.shape[-1] % m == 0 and bool((mask.reshape(-1, m).sum(-1) == n).all())
    pruned = 1.0 - mask.float().mean().item()
    return abs(pruned - sparsity) <= 1.0 / mask.shape[-1] + 1e-6


def check_layer(weight: torch.Tensor, mask: torch.Tensor, sparsity) -> bool:
    """A pruned weight obeys its mask exactly (pruned entries are 0.0) and the mask obeys the pattern."""
    ok = check_mask(mask, sparsity) and bool((weight[~mask] == 0).all())
    if isinstance(sparsity, tuple):
        ok = ok and check_nm(weight, *sparsity)
    return ok


def verify(model: nn.Module, masks: "dict[str, torch.Tensor]", sparsity) -> None:
    """Every pruned layer obeys its mask exactly and the pattern; raises otherwise."""
    modules = dict(model.named_modules())
    bad = [name for name, mask in masks.items() if not check_layer(modules[name].weight, mask, sparsity)]
    if bad:
        raise RuntimeError(f"pattern {sparsity_str(sparsity)} violated in {len(bad)} layers: {bad[:5]}")


# ----------------------------------------------------------------------------- the script

def main(argv=None):
    cfg = parse_config(Config, argv)
    sparsity = parse_sparsity(cfg.sparsity)
    if cfg.layers:
        parse_layers(cfg.layers)  # its spelling now; whether the model has those blocks once it is loaded
    if cfg.eval:
        check_ppl_seq_len(cfg.ppl_seq_len)
    device, data_dir = resolve_device(cfg.device), resolve_data_dir(cfg.data_dir)
    out = check_output_dir(cfg.out, cfg.overwrite) if cfg.out else None  # before the work, not after it
    model, tokenizer = load(cfg.ckpt, device=device, dtype=DTYPES[cfg.dtype])
    check_fits(prunable_linears(model, cfg.layers), sparsity)  # before the dense evaluation, not after it
    results = {"method": cfg.method, "sparsity": sparsity_str(sparsity)}
    ppl = WikiText2(tokenizer, data_dir, cfg.ppl_seq_len, cfg.ppl_windows) if cfg.eval else None
    if ppl is not None:
        t = time.perf_counter()
        results["dense_ppl"] = ppl(model)
        print(f"dense ppl {results['dense_ppl']:.3f} ({ppl.describe()}; {time.perf_counter() - t:.0f}s)", flush=True)
    calib = None
    if cfg.method != "magnitude":
        calib = calibration_windows(tokenizer, c4_paths(data_dir), cfg.nsamples, cfg.calib_len, cfg.seed)
        print(f"calibration: {calib.shape[0]} windows x {calib.shape[1]} tokens of C4, seed {cfg.seed}", flush=True)
    reset_peak_memory(device)
    report = {}
    masks = prune(model, cfg.method, sparsity, calib, layers=cfg.layers, blocksize=cfg.blocksize,
                  percdamp=cfg.percdamp, report=report)
    results.update(report, peak_memory_gb=peak_memory_gb(device))
    verify(model, masks, sparsity)
    work = f", {cfg.method}'s own work {report['method_s']:.1f}s" if cfg.method != "magnitude" else ""
    ratio = f" ({report['method_s'] / report['forward_s']:.2f}x the forward time)" if report["forward_s"] > 0 else ""
    print(f"verified {sparsity_str(sparsity)} on {len(masks)} layers; {cfg.method} {sparsity_str(sparsity)}: "
          f"{report['total_s']:.1f}s total, block forwards "
          f"{report['forward_s']:.1f}s{work}{ratio}; peak memory {results['peak_memory_gb']:.2f} GB "
          f"({'GPU allocated' if device.type == 'cuda' else 'process RSS'})", flush=True)
    if ppl is not None:
        results["ppl"] = ppl(model)
        print(f"{cfg.method} {sparsity_str(sparsity)} ppl {results['ppl']:.3f} ({ppl.describe()})", flush=True)
    if out:
        meta = {"pruning": dict(results, nsamples=cfg.nsamples, calib_len=cfg.calib_len, seed=cfg.seed,
                                layers=cfg.layers, ckpt=cfg.ckpt, protocol=ppl and ppl.describe())}
        save(model, tokenizer, out, masks={k: v.cpu() for k, v in masks.items()}, meta=meta)
        print(f"saved {out}", flush=True)
    return results


if __name__ == "__main__":
    cli_main(main)
