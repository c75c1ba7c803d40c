"""Pruning-Aware Tuning (PAT, Liu et al., AAAI 2025, arXiv 2408.14721): fine-tune a Llama with LoRA while one
trainable mask, shared by Hybrid Sparsification Modules (HSMs) on every write into the residual stream,
learns which hidden channels to drop; then merge everything into a plain, narrower Llama (dim d -> d').

    python train_pat.py                # CPU demo on SmolLM2-135M: 90 steps, our mask init (README: time and numbers)
    python train_pat.py --ckpt llama2-7b --data instruct/lamini-10k.jsonl --mask-init zeros --max-steps 30000 \
        --milestone 10000 --batch-size 8 --grad-accum 16 --seq-len 256 --lr 5e-5 --mask-lr 5e-5 --warmup-steps 100 \
        --grad-clip 0.3 --hsm-rank 200 --lora-rank 20 --lora-alpha 4 --ppl-windows 0   # the paper's recipe
    torchrun --nproc_per_node 8 train_pat.py --ckpt llama2-7b ...

The model is never edited: LoRA and the HSMs (y -> s (I + L1 diag(v) L0) y times the shared mask) are forward
hooks on the frozen projections. The mask: soft gate sigmoid(tau(s) w) + beta(s) with its count loss; from
0.8 s0 the task loss no longer moves it (official code); at s0 it becomes the hard top-N mask. Identity Loss
||L0 L0^T - I|| + ||L1^T L1 - I|| over every HSM. `merge` folds it all into a plain narrower checkpoint in
<out>/final/ (checkpoint.load, eval.py, checkpoint.export_hf read it).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import data
import training
from cli import Progress, UserError, autocast, cli_main, parse_config
from eval import WikiText2
from model import PROJECTIONS, ModelArgs, Transformer
from training import TrainArgs

READERS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
WRITERS = ("attention.wo", "feed_forward.w2")


@dataclass
class PATArgs(TrainArgs):
    """Pruning-Aware Tuning: LoRA + a trainable hidden-channel mask, merged into a narrower Llama."""
    # the defaults of the shared fields are the CPU demo's (python train_pat.py with no arguments)
    out: str = "out/pat"
    max_steps: int = 90
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3  # LoRA and HSM peak lr (the paper: 5e-5 over ~30k steps on Llama-2-7B)
    warmup_steps: int = 5
    ckpt_interval: int = 0
    eval_interval: int = 0
    ppl_windows: int = 4
    ppl_seq_len: int = 512
    log_interval: int = 5
    data: str = "text"  # instruction JSONL (under --data-dir unless a path; the paper: LaMini), "text", or files a,b
    ratio: float = 0.25  # fraction of the hidden dimension to remove; 0: plain LoRA fine-tuning
    width_multiple: int = 8  # the final width is a multiple of this
    milestone: int = 0  # s0: the step where the mask becomes hard; 0: max_steps // 3
    freeze_at: float = 0.8  # fraction of s0 from which tau and the task's pull on the mask stop (official); 1: none
    mask_lr: float = 0.02  # lr of the mask logits
    mask_init: Literal["rms", "zeros"] = "rms"  # zeros: the paper's; rms (ours, the demo's): from channel norms
    calib_batches: int = 4  # first training batches that measure the channel norms (rms init, one-shot baseline)
    baseline: bool = True  # also print the one-shot prune of the lowest-RMS channels at the same width (same windows)
    count_weight: float = 10.0  # weight of the count loss |#open - N| / N (official code: 10)
    polar_weight: float = 1.0  # weight of the polarisation term that pushes logits to +-0.5 (official code: 1)
    identity_weight: float = 1.0  # lambda_id: Identity Loss summed over all HSMs (the paper); 1/(2L+1): the mean
    hsm_rank: int = 8  # r of each HSM (paper: 200 for d = 4096)
    lora_rank: int = 8  # LoRA on all seven projections (paper: 20)
    lora_alpha: float = 16.0  # LoRA scale alpha (the update is alpha / r * B A)
    keep_tied: bool = True  # tied embeddings: mask-only embedding HSM so the merged model stays tied


def target_width(dim: int, ratio: float, multiple: int) -> int:
    """N = round(dim * (1 - ratio)) rounded to a multiple of `multiple` (kernels like multiples of 8)."""
    return max(multiple, min(dim, round(round(dim * (1 - ratio)) / multiple) * multiple))


def mask_schedule(step: int, milestone: int, freeze: int | None = None) -> tuple[float, float]:
    """(tau, beta) of the soft gate sigmoid(tau * w) + beta before s0 (the paper's); tau stops at `freeze` (official)."""
    s = step if freeze is None else min(step, freeze)
    tau = 1.0 / (1.0 - math.log(max(1, s)) / math.log(max(2, milestone)))
    beta = max(0.5 - step / milestone, 0.0)  # the official code keeps beta on the real step (0 by s0 / 2 anyway)
    return tau, beta


class LoRA(nn.Module):
    """W x + (alpha / r) B A x, with B = 0 at start (a hook adds the second term to the frozen linear)."""

    def __init__(self, in_features, out_features, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, in_features), a=math.sqrt(5)))  # nn.Linear's
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scaling = alpha / rank

    def forward(self, x):
        return F.linear(F.linear(x.to(self.A.dtype), self.A), self.B) * self.scaling

    def delta(self):
        return self.scaling * self.B @ self.A


class HSM(nn.Module):
    """The operator part of one HSM: y -> s * (y + L1 diag(v) L0 y), kept in fp32; the shared mask multiplies it.
    L0 (r x d) starts like nn.Linear, L1 (d x r) = 0: the identity. v (r) is the paper's scale between L1 and L0
    (D = L1 diag(v) L0 + I), s (d) a per-channel output scale. Rank 0: a mask-only HSM (no parameters)."""

    def __init__(self, dim, rank):
        super().__init__()
        self.rank = rank
        if rank:
            self.L0 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, dim), a=math.sqrt(5)))
            self.L1 = nn.Parameter(torch.zeros(dim, rank))
            self.v = nn.Parameter(torch.ones(rank))
            self.s = nn.Parameter(torch.ones(dim))

    def forward(self, y):
        return self.s * (y + F.linear(F.linear(y, self.L0) * self.v, self.L1)) if self.rank else y

    def operator(self):
        """T = diag(s) (I + L1 diag(v) L0), the d x d matrix the merge folds into the writer."""
        return self.s[:, None] * (torch.eye(self.L1.shape[0], device=self.L1.device) + (self.L1 * self.v) @ self.L0)

    def identity_loss(self):
        """||L0 L0^T - I_r||_F + ||L1^T L1 - I_r||_F (paper eq.): L0, L1 carry rotation, v and s the scale."""
        eye = torch.eye(self.rank, device=self.L0.device)
        return torch.linalg.matrix_norm(self.L0 @ self.L0.T - eye) + torch.linalg.matrix_norm(self.L1.T @ self.L1 - eye)


class PAT(nn.Module):
    """The frozen model plus LoRA adapters, 2L + 1 HSMs and the shared mask, attached as forward hooks: calling
    `pat.model(tokens)` anywhere (training, perplexity, generate) runs the adapted model. The schedule lives on the
    host (`step`, `is_hard`) and in tensors (tau, beta): a forward reads nothing back from the device."""

    def __init__(self, model, ratio=0.25, width_multiple=8, milestone=100, hsm_rank=8, lora_rank=8,
                 lora_alpha=16.0, keep_tied=True, freeze_at=0.8):
        super().__init__()
        self.model = model.requires_grad_(False)
        args, self.dim = model.args, model.args.dim
        self.n_open = target_width(args.dim, ratio, width_multiple) if ratio > 0 else args.dim
        self.milestone, self.freeze, self.is_hard = milestone, int(freeze_at * milestone), False
        self.frozen = self.freeze <= 0  # host bools that flip once: a compiled forward recompiles once, not per step
        self.lora, self.hsms, self.hooks = nn.ModuleDict(), nn.ModuleDict(), []
        for name, module in model.named_modules():
            if lora_rank and name.endswith(PROJECTIONS):
                lora = LoRA(module.in_features, module.out_features, lora_rank, lora_alpha)
                self.lora[name.replace(".", "_")] = lora
                self.hooks.append(module.register_forward_hook(
                    lambda m, a, out, lora=lora: out + lora(a[0]).to(out.dtype)))  # W x + LoRA(x)
        if ratio > 0:
            self.mask_logits = nn.Parameter(torch.zeros(args.dim))
            self.register_buffer("keep", torch.ones(args.dim, dtype=torch.bool))  # the hard mask after s0
            self.register_buffer("hard", torch.tensor(False))  # is_hard, saved for a resume
            self.register_buffer("tau", torch.tensor(1.0), persistent=False)
            self.register_buffer("beta", torch.tensor(0.5), persistent=False)
            tied = model.output.weight is model.tok_embeddings.weight
            # a full embedding HSM changes the table, which a tied LM head must not see: mask-only keeps the tie
            embed_rank = 0 if tied and keep_tied else hsm_rank
            writers = [("tok_embeddings", model.tok_embeddings, embed_rank)]
            writers += [(n, m, hsm_rank) for n, m in model.named_modules() if n.endswith(WRITERS)]
            for name, module, rank in writers:
                hsm = HSM(args.dim, rank)
                self.hsms[name.replace(".", "_")] = hsm
                # registered after the LoRA hook, so the HSM sees W x + LoRA(x)
                self.hooks.append(module.register_forward_hook(self._hsm_hook(hsm)))
            # the mask is computed once per forward, before the first hook reads it
            self.hooks.append(model.register_forward_pre_hook(lambda m, a: setattr(self, "_mask", self.mask().float())))
            self._mask = None
        self.to(next(model.parameters()).device)

    @property
    def prunes(self):
        return hasattr(self, "mask_logits")

    def forward(self, tokens):
        return self.model(tokens)

    def _hsm_hook(self, hsm):
        def hook(module, inputs, y):
            with torch.autocast(y.device.type, enabled=False):  # HSMs stay in fp32
                z = hsm(y.float()) * self._mask
            return z.to(y.dtype)
        return hook

    def mask(self):
        """m = sigmoid(tau(s) w) + beta(s) before the milestone; the hard top-N mask after it."""
        w = self.mask_logits
        if self.is_hard:
            return self.keep.float() + 0.0 * w  # w stays in the graph with a zero gradient (DDP wants every param used)
        if self.frozen:  # official: from 0.8 s0 only the count and polarisation terms move the logits
            w = w.detach()
        return torch.sigmoid(self.tau * w) + self.beta

    def set_step(self, step):
        """Advance the schedule; at the milestone keep exactly the top-N logits (the final width asked for)."""
        self.frozen = step >= self.freeze
        if not self.prunes or self.is_hard:
            return
        if step >= self.milestone:
            self.set_hard_mask(top_n(self.mask_logits.detach(), self.n_open))
        else:  # in place: a compiled forward reads the same tensors at every step
            for buffer, value in zip((self.tau, self.beta), mask_schedule(step, self.milestone, self.freeze)):
                buffer.fill_(value)

    def set_hard_mask(self, keep: torch.Tensor | None):
        """Use a given hard mask (bool, d) from now on (a merge without training, an outside choice); None: soft again."""
        self.is_hard = keep is not None
        self.keep.copy_(keep if self.is_hard else torch.ones_like(self.keep))
        self.hard.fill_(self.is_hard)

    def n_open_now(self) -> int:
        """Open channels (w >= 0, as the count loss sees them); a host sync: call it on logging steps only."""
        return self.dim if not self.prunes else int(self.keep.sum() if self.is_hard else (self.mask_logits >= 0).sum())

    def mask_losses(self):
        """(count loss |sum 1[w >= 0] - N| / N with a straight-through step, polarisation of w > 0 to +0.5, w <= 0 to
        -0.5), as the official code: w >= 0 counts the starting logits (exactly 0) as open."""
        w = self.mask_logits
        if self.is_hard:
            return 0.0 * w.sum(), 0.0 * w.sum()
        count = ((w >= 0).float() + w - w.detach()).sum()  # forward: the count; backward: identity (STE)
        count_loss = (count - self.n_open).abs() / self.n_open
        pos = (w > 0).float()  # masked means instead of w[w > 0]: no data-dependent shape, no host sync
        polar = sum(((w - c) ** 2 * g).sum() / g.sum().clamp(min=1) for g, c in ((pos, 0.5), (1 - pos, -0.5)))
        return count_loss, polar

    def identity_loss(self):
        """Summed over ALL HSMs with an operator, as the paper writes it (the official code keeps the last layer's)."""
        losses = [hsm.identity_loss() for hsm in self.hsms.values() if hsm.rank]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.model.output.weight.device)

    def trainable_state(self):
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_trainable_state(self, state):
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise UserError(f"the state does not match this PAT configuration (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); resume with the same flags as the run that wrote it")
        self.is_hard = self.prunes and bool(self.hard)


def top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the n largest scores."""
    return torch.zeros_like(scores, dtype=torch.bool).index_fill_(0, torch.topk(scores, n).indices, True)


@torch.no_grad()
def residual_channel_norms(model, batches) -> torch.Tensor:
    """sqrt(sum of x^2) per hidden channel over every RMSNorm input (the residual stream) of the token batches."""
    total = torch.zeros(model.args.dim, device=model.output.weight.device)

    def hook(module, inputs):  # returns None: a pre-hook's return value would replace the input
        total.add_(inputs[0].float().pow(2).sum((0, 1)))
    hooks = [m.register_forward_pre_hook(hook) for n, m in model.named_modules() if n.endswith("norm")]
    for x in batches:
        model(x)
    for h in hooks:
        h.remove()
    if dist.is_initialized():  # every rank must start from the same logits
        dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def init_mask_from_norms(pat, norms):
    """Ours, beyond the paper: w = clamp(z / (2 median |z|), -1/2, 1/2), z = ln norm - theta with theta between the
    N-th and (N+1)-th largest: the N largest channels start open, those near the threshold weakly (easy to flip).
    The clamp keeps the start near the dense function (unclamped, massive channels start at m = 1.5: ppl 28 -> 50)."""
    z = norms.clamp_min(1e-12).log()
    top = torch.topk(z, min(pat.n_open + 1, pat.dim)).values
    z = z - ((top[-2] + top[-1]) / 2 if pat.n_open < pat.dim else top[-1] - 1)
    pat.mask_logits.copy_((z / (2 * z.abs().median().clamp_min(1e-12))).clamp(-0.5, 0.5))


@torch.no_grad()
def merge(pat: PAT):
    """Fold LoRA, the HSM operators (with their scales) and the hard mask into a plain narrower Transformer.
    Writers (embedding, wo, w2) get T = diag(s)(I + L1 diag(v) L0) on their output and lose the masked rows;
    readers (wq, wk, wv, w1, w3, output) lose the masked input columns; RMSNorm gains are multiplied by
    sqrt(d/d') and eps by d/d', because the RMS over d channels of which d - d' are zero is
    sqrt(d'/d) * sqrt(mean over the d' + eps * d/d'): the merged model equals the masked one exactly."""
    model, args = pat.model, pat.model.args
    tied = model.output.weight is model.tok_embeddings.weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.setdefault("output.weight", state["tok_embeddings.weight"])
    names = {n.replace(".", "_"): n for n, _ in model.named_modules()}  # ModuleDict key -> module name
    for key, lora in pat.lora.items():
        w = state[names[key] + ".weight"]
        w += lora.delta().to(w.dtype)
    new_args = args
    if pat.prunes:
        if not pat.is_hard:
            raise UserError("the mask is still soft: train past --milestone before merging")
        keep = pat.keep.nonzero().squeeze(1).to(model.output.weight.device)
        d, d_new = args.dim, len(keep)
        tied = tied and not pat.hsms["tok_embeddings"].rank  # a full embedding HSM unties: the head reads the raw table
        for key, hsm in pat.hsms.items():
            name = names[key]
            w = state[name + ".weight"]
            if name == "tok_embeddings":  # (V, d): the HSM acts on rows, so T multiplies from the right
                w = (w.float() @ hsm.operator().T).to(w.dtype) if hsm.rank else w
                state[name + ".weight"] = w[:, keep].contiguous()
            else:  # (d, in): T multiplies the output rows
                w = (hsm.operator() @ w.float()).to(w.dtype) if hsm.rank else w
                state[name + ".weight"] = w[keep].contiguous()
        for key in state:
            if key.endswith(tuple(r + ".weight" for r in READERS)) or key == "output.weight":
                state[key] = state[key][:, keep].contiguous()
            elif key.endswith("norm.weight"):
                state[key] = state[key][keep] * math.sqrt(d / d_new)
        new_args = ModelArgs(**{**asdict(args), "dim": d_new, "head_dim": args.head_dim,
                                "norm_eps": args.norm_eps * d / d_new, "tie_embeddings": tied})
    if tied:
        del state["output.weight"]
    with torch.device("meta"):  # no random init of weights that are overwritten next
        merged = Transformer(new_args)
    merged.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        merged.output.weight = merged.tok_embeddings.weight
    return merged.eval()


def count_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # a tied table counts once


def make_optimizer(pat, args, device):
    """AdamW over LoRA and HSMs (decay on matrices only) and the mask logits at --mask-lr, no decay: decay would
    pull logits and scales toward 0. Returns (optimizer, trainable parameters)."""
    decay = [p for n, p in pat.named_parameters() if p.requires_grad and p.ndim == 2]
    flat = [p for n, p in pat.named_parameters() if p.requires_grad and p.ndim < 2 and n != "mask_logits"]
    groups = [{"params": decay, "weight_decay": args.weight_decay, "lr_scale": 1.0},
              {"params": flat, "weight_decay": 0.0, "lr_scale": 1.0}]
    if pat.prunes:
        groups.append({"params": [pat.mask_logits], "weight_decay": 0.0, "lr_scale": args.mask_lr / args.lr})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    return optimizer, [p for g in groups for p in g["params"]]


def train_step(net, pat, optimizer, trainable, batches, step, args, device, amp, world_size, last_ckpt, log_now):
    """One optimizer step over grad_accum micro-batches. Returns (log record when `log_now`, else None; target
    tokens of this rank as a device tensor). The only host sync off logging steps is the per-step NaN stop."""
    lr = training.lr_at(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    task_sum = tokens = torch.zeros((), device=device)
    for micro in range(args.grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in batches.next())
        tokens = tokens + (y != -100).sum()
        sync = micro == args.grad_accum - 1 or world_size == 1
        with (nullcontext() if sync else net.no_sync()), autocast(amp, device):  # all-reduce on the last micro-batch
            logits = net(x)
            task = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
            loss = task
            if pat.prunes:
                count_loss, polar = pat.mask_losses()
                identity = pat.identity_loss()
                loss = loss + args.count_weight * count_loss + args.polar_weight * polar \
                    + args.identity_weight * identity
            (loss / args.grad_accum).backward()
        task_sum = task_sum + task.detach() / args.grad_accum
    training.check_finite(loss.detach(), step, last_ckpt)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pat.set_step(step + 1)
    if not log_now:
        return None, tokens
    record = {"step": step + 1, "loss": loss.item(), "task": task_sum.item(), "lr": lr, "grad_norm": float(grad_norm),
              "open": pat.n_open_now()}
    if pat.prunes:
        record |= {"count_loss": count_loss.item(), "identity": identity.item()}
        if step + 1 < pat.milestone:  # no tau once hard (an all-empty log panel cannot be drawn)
            record["tau"] = mask_schedule(step + 1, pat.milestone, pat.freeze)[0]
    return record, tokens


def one_shot_ppl(pat, keep, wikitext):
    """Perplexity with only the channels `keep`, before any training: the untrained PAT (LoRA B = 0, L1 = 0, s = 1)
    under a hard mask is exactly the one-shot prune (merge is exact), so no second copy of the model is made."""
    pat.set_hard_mask(keep)
    ppl = wikitext(pat.model)
    pat.set_hard_mask(None)  # back to the soft mask of a fresh run
    return ppl


def finish(pat, model, tokenizer, wikitext, args, step, log, refs):
    """Merge into the narrower Llama, print dense / one-shot prune / PAT perplexity side by side, save <out>/final/."""
    out, merged = Path(args.out), merge(pat.eval())
    ppl_tuned, ppl_merged = (wikitext(model), wikitext(merged)) if wikitext else (None, None)
    n_before, n_after = count_params(model), count_params(merged)
    print(f"merged: dim {pat.dim} -> {merged.args.dim}, parameters {n_before:,} -> {n_after:,} "
          f"({100 * (1 - n_after / n_before):.1f}% fewer)")
    log.log({"step": step, "ppl": ppl_tuned, "ppl_merged": ppl_merged})
    if wikitext:
        name = f"PAT, mask init {args.mask_init}{' (ours)' if args.mask_init == 'rms' else ''}" if pat.prunes else "LoRA"
        rows = [(f"dense, dim {pat.dim}", refs.get("dense")),
                (f"one-shot prune of the lowest-norm channels, dim {pat.n_open}", refs.get("one-shot")),
                (f"{name}, {step} steps, unmerged", ppl_tuned), (f"{name}, merged, dim {merged.args.dim}", ppl_merged)]
        print(f"\n{wikitext.describe()}:\n" + "\n".join(f"  {n:<58} {v:10.2f}" for n, v in rows if v is not None))
    checkpoint.save(merged, tokenizer, out / "final", meta={
        "method": "pat", "ratio": args.ratio, "source": args.ckpt, "steps": step, "mask_init": args.mask_init,
        "ppl_wikitext2": ppl_merged, "ppl_windows": args.ppl_windows, "ppl_seq_len": args.ppl_seq_len, "refs": refs})
    training.plot_log(log.path, out / "log.png", ["loss", "task", "count_loss", "identity", "open", "tau", "ppl", "lr"],
                      log_keys=("ppl", "tau"), refs={"ppl": {"before tuning": refs.get("dense"), "merged": ppl_merged}},
                      marks={f"milestone s0 = {pat.milestone}": pat.milestone} if pat.prunes else None)
    print(f"merged model: {out / 'final'} (python eval.py --ckpt {out / 'final'}); log: {log.path}, plot: {out / 'log.png'}")


def main(argv=None):
    args = parse_config(PATArgs, argv)
    milestone = args.milestone or max(1, args.max_steps // 3)
    if args.ratio > 0 and milestone >= args.max_steps:
        raise UserError(f"--milestone {milestone} must be below --max-steps {args.max_steps}: the mask must end hard")
    for bad, says in ((not 0 < args.freeze_at <= 1, f"--freeze-at {args.freeze_at}: must be in (0, 1]"),
                      (args.calib_batches < 1, f"--calib-batches {args.calib_batches}: must be positive")):
        if bad:
            raise UserError(says)
    rank, world_size, _, device = training.setup_distributed(args.device)
    master, out = rank == 0, Path(args.out)
    resumed = training.open_run(args, rank)
    if resumed is not None and resumed["step"] >= args.max_steps and (out / "final").exists():
        return training.teardown()  # without final/ the run stopped while merging: merge again
    torch.manual_seed(args.seed)
    amp = training.autocast_dtype(args.autocast, device)

    # on GPU the frozen base is stored in the compute dtype (no fp32 weights cast at every forward); CPU keeps fp32
    model, tokenizer = checkpoint.load(args.ckpt, device=device, dtype=amp if device.type == "cuda" else torch.float32)
    data_dir = data.resolve_data_dir(args.data_dir)
    batches = data.training_batches(args.data, data_dir, tokenizer, args.seq_len, args.batch_size, args.seed,
                                    rank, world_size)
    wikitext = WikiText2(tokenizer, data_dir, args.ppl_seq_len, args.ppl_windows) if args.eval else None
    step, last_ckpt, state_path, refs, norms = 0, None, out / "state.pt", {}, None
    log = training.JsonlLog(out / "log.jsonl")
    if master and wikitext and resumed is None:  # before the hooks: --mask-init rms starts off the dense function
        refs["dense"] = wikitext(model)
        print(f"WikiText-2 perplexity of {args.ckpt} (dense): {refs['dense']:.3f}")
        log.log({"step": 0, "ppl": refs["dense"]})
    if args.ratio > 0 and resumed is None and (args.mask_init == "rms" or args.baseline and args.eval):
        start = batches.state_dict()
        norms = residual_channel_norms(model, [batches.next()[0].to(device) for _ in range(args.calib_batches)])
        batches.load_state_dict(start)  # rewound, so every --mask-init trains on the same batches
    pat = PAT(model, args.ratio, args.width_multiple, milestone, args.hsm_rank, args.lora_rank,
              args.lora_alpha, args.keep_tied, args.freeze_at)
    if args.mask_init == "rms" and norms is not None:
        init_mask_from_norms(pat, norms)
    optimizer, trainable = make_optimizer(pat, args, device)
    if resumed is not None:
        pat.load_trainable_state(resumed["pat"])
        optimizer.load_state_dict(resumed["optimizer"])
        batches.load_state_dict(resumed["data"])
        training.set_rng_state(resumed["rng"])
        step, last_ckpt, refs = resumed["step"], state_path, resumed.get("refs", {})
    elif master:
        if wikitext and norms is not None and args.baseline:
            refs["one-shot"] = one_shot_ppl(pat, top_n(norms, pat.n_open), wikitext)
            print(f"WikiText-2 perplexity of the one-shot prune of the {pat.dim - pat.n_open} lowest-norm channels "
                  f"(no training): {refs['one-shot']:.3f}")
        print(f"PAT: dim {pat.dim} -> {pat.n_open} (ratio {args.ratio}), milestone {milestone}, mask frozen from step "
              f"{pat.freeze}, mask init {args.mask_init}{' (ours)' if args.mask_init == 'rms' else ''}, "
              f"{sum(p.numel() for p in trainable):,} trainable parameters ({len(pat.lora)} LoRA, {len(pat.hsms)} HSMs)")

    net = training.wrap(pat, device, world_size, compile=args.compile)
    progress, tokens_seen = Progress("step", args.max_steps, start=step), 0
    pat.train().set_step(step)
    with training.StopRequest() as stop:
        while step < args.max_steps:
            log_now = master and ((step + 1) % args.log_interval == 0 or step + 1 == args.max_steps)
            record, tokens = train_step(net, pat, optimizer, trainable, batches, step, args, device, amp, world_size,
                                        last_ckpt, log_now)
            step, tokens_seen = step + 1, tokens_seen + tokens
            if log_now:
                log.log(record)
                print(progress.line(step, int(tokens_seen) * world_size, loss=record["loss"], task=record["task"],
                                    lr=record["lr"], open=record["open"]), flush=True)
                tokens_seen = 0
            if master and wikitext and args.eval_interval and step % args.eval_interval == 0 and step < args.max_steps:
                ppl = wikitext(model)
                log.log({"step": step, "ppl": ppl})
                print(f"step {step}: WikiText-2 perplexity {ppl:.3f}")
            stopping = stop.requested(device)
            if step == args.max_steps or args.ckpt_interval and step % args.ckpt_interval == 0 or stopping:
                if master:
                    training.save_state(state_path, {"step": step, "pat": pat.trainable_state(),
                                                     "optimizer": optimizer.state_dict(), "data": batches.state_dict(),
                                                     "rng": training.rng_state(), "refs": refs, "args": asdict(args)})
                last_ckpt = state_path
            if stopping and step < args.max_steps:
                stop.stop(step, args)
    if master:
        finish(pat, model, tokenizer, wikitext, args, step, log, refs)
    training.teardown()


if __name__ == "__main__":
    cli_main(main)
