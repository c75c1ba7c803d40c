"""
Pruning-Aware Tuning (PAT, Liu et al., AAAI 2025, arXiv 2408.14721): fine-tune a Llama with LoRA while one
trainable mask, shared by Hybrid Sparsification Modules (HSMs) on every write into the residual stream,
learns which hidden channels to drop; then merge everything into a plain, narrower Llama (dim d -> d').

    python train_pat.py                                    # CPU demo on SmolLM2-135M (about a minute on 2 idle cores)
    python train_pat.py --ckpt llama2-7b --ratio 0.25 --max-steps 30000 --batch-size 8 --grad-accum 16 \
        --seq-len 256 --lr 5e-5 --ppl-windows 0            # the paper's recipe (LaMini, 3 epochs)
    torchrun --nproc_per_node 8 train_pat.py --ckpt llama2-7b ...

The model is never edited: LoRA and the HSMs are forward hooks on the frozen projections, so the model
starts exactly at the pretrained function (L1 = 0). The paper's pieces: the HSM y -> s (I + L1 diag(v) L0) y
times the shared mask; the soft gate sigmoid(tau(s) w) + beta(s) with its count loss; the Identity Loss
||L0 L0^T - I|| + ||L1^T L1 - I||. At the milestone s0 the soft mask becomes a hard top-N mask; after
training, `merge` folds LoRA, the HSM operators and their scales into the weights, deletes the masked
channels from every writer and reader of the residual stream, and the result is saved to <out>/final/
as an ordinary checkpoint (checkpoint.load, eval.py, checkpoint.export_hf read it).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
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
    max_steps: int = 16
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3  # LoRA and HSM peak lr (the paper: 5e-5 over ~30k steps on Llama-2-7B)
    warmup_steps: int = 2
    ckpt_interval: int = 0
    eval_interval: int = 0
    ppl_windows: int = 4
    ppl_seq_len: int = 512
    log_interval: int = 1
    data: str = "instruct/lamini-10k.jsonl"  # instruction JSONL (under --data-dir unless a path), "text", or text files a,b
    ratio: float = 0.25  # fraction of the hidden dimension to remove; 0: plain LoRA fine-tuning
    width_multiple: int = 8  # the final width is a multiple of this
    milestone: int = 0  # s0: the step where the mask becomes hard; 0: max_steps // 3
    mask_lr: float = 0.02  # lr of the mask logits
    count_weight: float = 10.0  # weight of the count loss |#open - N| / N (official code: 10)
    polar_weight: float = 1.0  # weight of the polarisation term that pushes logits to +-0.5 (official code: 1)
    identity_weight: float = 1.0  # lambda_id: Identity Loss, averaged over all HSMs
    hsm_rank: int = 8  # r of each HSM (paper: 200 for d = 4096)
    lora_rank: int = 8  # LoRA on all seven projections (paper: 20)
    lora_alpha: float = 16.0  # LoRA scale alpha (the update is alpha / r * B A)
    keep_tied: bool = True  # tied embeddings: mask-only embedding HSM so the merged model stays tied


def target_width(dim: int, ratio: float, multiple: int) -> int:
    """N = round(dim * (1 - ratio)) rounded to a multiple of `multiple` (kernels like multiples of 8)."""
    n = round(round(dim * (1 - ratio)) / multiple) * multiple
    return max(multiple, min(dim, n))


def mask_schedule(step: int, milestone: int) -> tuple[float, float]:
    """(tau, beta) of the soft gate sigmoid(tau * w) + beta before the milestone s0 (the paper's trainable mask)."""
    tau = 1.0 / (1.0 - math.log(max(1, step)) / math.log(max(2, milestone)))
    beta = max(0.5 - step / milestone, 0.0)
    return tau, beta


class LoRA(nn.Module):
    """W x + (alpha / r) B A x, with B = 0 at start (a hook adds the second term to the frozen linear)."""

    def __init__(self, in_features, out_features, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's init
        self.scaling = alpha / rank

    def forward(self, x):
        return F.linear(F.linear(x.to(self.A.dtype), self.A), self.B) * self.scaling

    def delta(self):
        return self.scaling * self.B @ self.A


class HSM(nn.Module):
    """The operator part of one HSM: y -> s * (y + L1 diag(v) L0 y), kept in fp32; the shared mask multiplies it.

    L0 (r x d) starts like nn.Linear, L1 (d x r) = 0, so it starts as the identity. v (r) is the paper's
    scale between L1 and L0 (D = L1 diag(v) L0 + I, Identity Loss on L0, L1); s (d) a per-channel output
    scale. rank 0 is a mask-only HSM (no parameters)."""

    def __init__(self, dim, rank):
        super().__init__()
        self.rank = rank
        if rank:
            self.L0 = nn.Parameter(torch.empty(rank, dim))
            nn.init.kaiming_uniform_(self.L0, a=math.sqrt(5))
            self.L1 = nn.Parameter(torch.zeros(dim, rank))
            self.v = nn.Parameter(torch.ones(rank))
            self.s = nn.Parameter(torch.ones(dim))

    def forward(self, y):
        if not self.rank:
            return y
        return self.s * (y + F.linear(F.linear(y, self.L0) * self.v, self.L1))

    def operator(self):
        """T = diag(s) (I + L1 diag(v) L0), the d x d matrix the merge folds into the writer."""
        eye = torch.eye(self.L1.shape[0], device=self.L1.device)
        return self.s[:, None] * (eye + (self.L1 * self.v) @ self.L0)

    def identity_loss(self):
        """||L0 L0^T - I_r||_F + ||L1^T L1 - I_r||_F (paper eq.): L0, L1 carry rotation, v and s the scale."""
        eye = torch.eye(self.rank, device=self.L0.device)
        return (torch.linalg.matrix_norm(self.L0 @ self.L0.T - eye)
                + torch.linalg.matrix_norm(self.L1.T @ self.L1 - eye))


class PAT(nn.Module):
    """The frozen model plus LoRA adapters, 2L + 1 HSMs and the shared mask, attached as forward hooks.

    Calling `pat.model(tokens)` anywhere (training, perplexity, generate) runs the adapted model: a
    pre-hook on the model computes the mask once per forward from the current step."""

    def __init__(self, model, ratio=0.25, width_multiple=8, milestone=100, hsm_rank=8, lora_rank=8,
                 lora_alpha=16.0, keep_tied=True):
        super().__init__()
        self.model = model.requires_grad_(False)
        args = model.args
        self.dim = args.dim
        self.n_open = target_width(args.dim, ratio, width_multiple) if ratio > 0 else args.dim
        self.milestone, self.step = milestone, 0
        self.lora = nn.ModuleDict()
        self.hsms = nn.ModuleDict()
        self.hooks = []
        for name, module in model.named_modules():
            if lora_rank and name.endswith(PROJECTIONS):
                lora = LoRA(module.in_features, module.out_features, lora_rank, lora_alpha)
                self.lora[name.replace(".", "_")] = lora
                self.hooks.append(module.register_forward_hook(self._lora_hook(lora)))
        if ratio > 0:
            self.mask_logits = nn.Parameter(torch.zeros(args.dim))
            self.register_buffer("keep", torch.ones(args.dim, dtype=torch.bool))  # the hard mask after s0
            self.register_buffer("hard", torch.tensor(False))
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
            self.hooks.append(model.register_forward_pre_hook(lambda module, inputs: self._refresh_mask()))
            self._mask = None
        self.to(next(model.parameters()).device)

    @property
    def prunes(self):
        return hasattr(self, "mask_logits")

    def forward(self, tokens):
        return self.model(tokens)

    @staticmethod
    def _lora_hook(lora):
        return lambda module, inputs, out: out + lora(inputs[0]).to(out.dtype)

    def _hsm_hook(self, hsm):
        def hook(module, inputs, y):
            with torch.autocast(y.device.type, enabled=False):  # HSMs stay in fp32
                z = hsm(y.float()) * self._mask
            return z.to(y.dtype)
        return hook

    def mask(self):
        """m = sigmoid(tau(s) w) + beta(s) before the milestone; the hard top-N mask after it."""
        w = self.mask_logits
        if self.hard:
            return self.keep.float() + 0.0 * w  # w stays in the graph with a zero gradient (DDP wants every param used)
        tau, beta = mask_schedule(self.step, self.milestone)
        return torch.sigmoid(tau * w) + beta

    def _refresh_mask(self):
        self._mask = self.mask().float()

    def set_step(self, step):
        """Advance the schedule; at the milestone keep exactly the top-N logits (the final width asked for)."""
        self.step = step
        if self.prunes and step >= self.milestone and not self.hard:
            keep = torch.zeros_like(self.keep)
            keep[torch.topk(self.mask_logits.detach(), self.n_open).indices] = True
            self.keep.copy_(keep)
            self.hard.fill_(True)

    def set_hard_mask(self, keep: torch.Tensor):
        """Use a given hard mask (bool, d) from now on: a merge without training, or an outside channel choice."""
        self.keep.copy_(keep)
        self.hard.fill_(True)

    def n_open_now(self) -> int:
        if not self.prunes:
            return self.dim
        return int(self.keep.sum()) if self.hard else int((self.mask_logits > 0).sum())

    def mask_losses(self):
        """(count loss, polarisation): |sum 1[w > 0] - N| / N with a straight-through step, and the push from 0."""
        w = self.mask_logits
        if self.hard:
            zero = 0.0 * w.sum()
            return zero, zero
        step = (w > 0).float()
        count = (step + w - w.detach()).sum()  # forward: the count; backward: identity (STE)
        count_loss = (count - self.n_open).abs() / self.n_open
        pos, neg = w[w > 0], w[w <= 0]
        polar = sum(((x - c) ** 2).mean() for x, c in ((pos, 0.5), (neg, -0.5)) if x.numel())
        return count_loss, polar + 0.0 * w.sum()

    def identity_loss(self):
        """Mean over ALL HSMs with an operator (the official code keeps only the last layer's)."""
        losses = [hsm.identity_loss() for hsm in self.hsms.values() if hsm.rank]
        return torch.stack(losses).mean() if losses else torch.zeros((), device=self.model.output.weight.device)

    def trainable_state(self):
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_trainable_state(self, state):
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise UserError(f"the state does not match this PAT configuration (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); resume with the same flags as the run that wrote it")


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
    for key, lora in pat.lora.items():
        w = state[_module_name(key) + ".weight"]
        w += lora.delta().to(w.dtype)
    new_args = args
    if pat.prunes:
        if not bool(pat.hard):
            raise UserError("the mask is still soft: train past --milestone before merging")
        keep = pat.keep.nonzero().squeeze(1).to(model.output.weight.device)
        d, d_new = args.dim, len(keep)
        embed_hsm = pat.hsms["tok_embeddings"]
        tied = tied and not embed_hsm.rank  # the LM head reads the untransformed table: a full embedding HSM unties
        for key, hsm in pat.hsms.items():
            name = _module_name(key)
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


def _module_name(key: str) -> str:
    """ModuleDict key (dots replaced) -> module name: layers_3_attention_wo -> layers.3.attention.wo."""
    if key == "tok_embeddings":
        return key
    _, i, rest = key.split("_", 2)
    group, proj = rest.rsplit("_", 1)
    return f"layers.{i}.{group}.{proj}"


# ----------------------------------------------------------------------------- training


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
    tokens seen by all ranks). The record's values are host syncs, so they are read only on logging steps."""
    lr = training.lr_at(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    task_sum, tokens = 0.0, 0
    for micro in range(args.grad_accum):
        x, y = (t.to(device) for t in batches.next())
        tokens += int((y != -100).sum()) * world_size
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
        task_sum += task.item() / args.grad_accum
    training.check_finite(loss.detach(), step, last_ckpt)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pat.set_step(step + 1)
    if not log_now:
        return None, tokens
    record = {"step": step + 1, "loss": loss.item(), "task": task_sum, "lr": lr, "grad_norm": float(grad_norm),
              "open": pat.n_open_now()}
    if pat.prunes:
        tau = mask_schedule(step + 1, pat.milestone)[0] if step + 1 < pat.milestone else None
        record |= {"count_loss": count_loss.item(), "identity": identity.item(), "tau": tau}
    return record, tokens


def finish(pat, model, tokenizer, wikitext, args, step, log, ppl_before):
    """Merge into the narrower Llama, print before/after perplexity and size, save <out>/final/ and the plot."""
    out = Path(args.out)
    pat.eval()
    ppl_tuned = wikitext(model) if wikitext else None
    if wikitext:
        print(f"WikiText-2 perplexity after tuning (unmerged{', hard mask' if pat.prunes else ''}): {ppl_tuned:.3f}")
    merged = merge(pat)
    ppl_merged = wikitext(merged) if wikitext else None
    n_before, n_after = count_params(model), count_params(merged)
    print(f"WikiText-2 perplexity after merge: {ppl_merged and f'{ppl_merged:.3f}'}  (dim {pat.dim} -> "
          f"{merged.args.dim}; parameters {n_before:,} -> {n_after:,}, {100 * (1 - n_after / n_before):.1f}% fewer)")
    log.log({"step": step, "ppl": ppl_tuned, "ppl_merged": ppl_merged})
    checkpoint.save(merged, tokenizer, out / "final",
                    meta={"method": "pat", "ratio": args.ratio, "source": args.ckpt, "steps": step,
                          "ppl_wikitext2": ppl_merged, "ppl_windows": args.ppl_windows,
                          "ppl_seq_len": args.ppl_seq_len})
    training.plot_log(log.path, out / "log.png", ["loss", "task", "count_loss", "identity", "open", "tau", "ppl", "lr"],
                      log_keys=("ppl", "tau"), refs={"ppl": {"before tuning": ppl_before, "merged": ppl_merged}},
                      marks={f"milestone s0 = {pat.milestone}": pat.milestone} if pat.prunes else None)
    print(f"merged model: {out / 'final'} (python eval.py --ckpt {out / 'final'}); log: {log.path}, plot: {out / 'log.png'}")


def main(argv=None):
    args = parse_config(PATArgs, argv)
    milestone = args.milestone or max(1, args.max_steps // 3)
    if args.ratio > 0 and milestone >= args.max_steps:
        raise UserError(f"--milestone {milestone} must be below --max-steps {args.max_steps}: the mask must end hard")
    rank, world_size, _, device = training.setup_distributed(args.device)
    master, out = rank == 0, Path(args.out)
    resumed = training.open_run(args, rank)
    if resumed is not None and resumed["step"] >= args.max_steps:
        return training.teardown()
    torch.manual_seed(args.seed)
    amp = training.autocast_dtype(args.autocast, device)

    model, tokenizer = checkpoint.load(args.ckpt, device=device, dtype=torch.float32)
    pat = PAT(model, args.ratio, args.width_multiple, milestone, args.hsm_rank, args.lora_rank,
              args.lora_alpha, args.keep_tied)
    data_dir = data.resolve_data_dir(args.data_dir)
    batches = data.training_batches(args.data, data_dir, tokenizer, args.seq_len, args.batch_size, args.seed,
                                    rank, world_size)
    wikitext = WikiText2(tokenizer, data_dir, args.ppl_seq_len, args.ppl_windows) if args.eval else None
    optimizer, trainable = make_optimizer(pat, args, device)

    step, last_ckpt, state_path, ppl_before = 0, None, out / "state.pt", None
    log = training.JsonlLog(out / "log.jsonl")
    if resumed is not None:
        pat.load_trainable_state(resumed["pat"])
        optimizer.load_state_dict(resumed["optimizer"])
        batches.load_state_dict(resumed["data"])
        training.set_rng_state(resumed["rng"])
        step, last_ckpt, ppl_before = resumed["step"], state_path, resumed.get("ppl_before")
    elif master:
        print(f"PAT on {args.ckpt}: dim {pat.dim} -> {pat.n_open} (ratio {args.ratio}), milestone {milestone}, "
              f"{sum(p.numel() for p in trainable):,} trainable parameters "
              f"({len(pat.lora)} LoRA, {len(pat.hsms)} HSMs), {count_params(model):,} in the model")
        ppl_before = wikitext(model) if wikitext else None
        if wikitext:
            print(f"WikiText-2 perplexity before tuning: {ppl_before:.3f}")
            log.log({"step": 0, "ppl": ppl_before})

    net = training.wrap(pat, device, world_size, compile=args.compile)
    progress = Progress("step", args.max_steps, start=step)
    pat.train()
    pat.set_step(step)
    tokens_seen = 0
    with training.StopRequest() as stop:
        while step < args.max_steps:
            log_now = master and ((step + 1) % args.log_interval == 0 or step + 1 == args.max_steps)
            record, tokens = train_step(net, pat, optimizer, trainable, batches, step, args, device, amp, world_size,
                                        last_ckpt, log_now)
            step, tokens_seen = step + 1, tokens_seen + tokens
            if log_now:
                log.log(record)
                print(progress.line(step, tokens_seen, loss=record["loss"], task=record["task"], lr=record["lr"],
                                    open=record["open"]), flush=True)
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
                                                     "rng": training.rng_state(), "ppl_before": ppl_before,
                                                 "args": asdict(args)})
                last_ckpt = state_path
            if stopping and step < args.max_steps:
                stop.stop(step, args)
    if master:
        finish(pat, model, tokenizer, wikitext, args, step, log, ppl_before)
    training.teardown()


if __name__ == "__main__":
    cli_main(main)
