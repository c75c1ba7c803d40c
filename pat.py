"""Pruning-Aware Tuning's method (PAT, Liu et al., AAAI 2025, arXiv 2408.14721), without the training loop:
LoRA adapters and Hybrid Sparsification Modules (HSMs) with one shared trainable hidden-channel mask, attached
as forward hooks to a frozen Llama; the mask's schedule and losses; the Identity Loss; and the merge into a plain,
narrower Llama. train_pat.py trains it.

    pat = PAT(model, ratio=0.25, milestone=s0)   # hooks on `model`: calling model(x) runs the adapted model
    pat.set_step(step)                            # the schedule: soft gate, freeze at 0.8 s0, hard top-N at s0
    merged = merge(pat)                           # a Transformer of width N that computes the masked model
    merged = prune_channels(model, keep)          # the one-shot prune of the channels not in `keep`

An HSM on every write into the residual stream (embedding, attention wo, MLP w2): y -> s (I + L1 diag(v) L0) y
times the shared mask m = sigmoid(tau(s) w) + beta(s) before s0, the hard top-N after.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from model import PROJECTIONS, ModelArgs, Transformer

READERS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
WRITERS = ("attention.wo", "feed_forward.w2")


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

    def set_hard_mask(self, keep: torch.Tensor):
        """Use a given hard mask (bool, d) from now on: the top-N at s0, or an outside choice (prune_channels)."""
        self.is_hard = True
        self.keep.copy_(keep)
        self.hard.fill_(True)

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

    def remove_hooks(self):
        """Detach from the model: calling it runs the plain model again (its parameters stay frozen)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


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


def prune_channels(model, keep: torch.Tensor):
    """The one-shot prune: `model` without the hidden channels not in `keep` (bool, d), as a narrower Transformer.
    An untrained PAT under that hard mask is exactly this model (LoRA B = 0, HSMs the identity; merge is exact);
    the hooks are removed again (`model`'s parameters are left frozen)."""
    pat = PAT(model, ratio=1 - int(keep.sum()) / model.args.dim, width_multiple=1, milestone=1, hsm_rank=0, lora_rank=0)
    pat.set_hard_mask(keep)
    merged = merge(pat)
    pat.remove_hooks()
    return merged
