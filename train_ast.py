"""
AST, the Adaptive Sparse Trainer (Huang et al., AAAI 2025, arXiv 2407.20584):
retrain a Llama into exact 2:4 sparsity on the seven projections of every block.

    python train_ast.py                               # CPU demonstration on SmolLM2-135M (about 4 minutes)
    python train_ast.py --ckpt smollm2-135m --max-steps 2000 --batch-size 16 --seq-len 1024 --lr 1e-4
    torchrun --nproc_per_node 8 train_ast.py --ckpt llama2-7b --fsdp --seq-len 4096 --batch-size 2 \
        --grad-accum 8 --max-steps 15000 --lr 2e-5 --warmup-steps 500 --alpha 0.33 --decay-max 6e-5 \
        --decay-warmup 3000 --decay-form grad --activation-checkpointing --ppl-seq-len 4096
        # the paper's LLaMA2-7B recipe; its λ_max and lr were tuned with the official code's gradient form

The method, one line each (the paper's §3, Method):
- masks: bool, 2 of every 4 consecutive inputs kept per output row, by |W| (or --init-mask from a
  Wanda/SparseGPT checkpoint of sparsity.py);
- forward with W ⊙ M, backward straight through to the dense W (STE), so pruned weights can come back;
- masks recomputed from |W| every --mask-interval steps (0: a fixed mask); the flip rate is logged;
- annealed decay λ(t) = λ_max · min(t / T0, 1) pulls the pruned weights toward zero (ARS-STE);
- loss α·T²·KL(teacher ‖ student) + (1 − α)·CE against the frozen dense model;
- optional SLoRB branches y += S (X x) (--slorb-k 16).
The result goes to <out>/final/ with exact 2:4 zeros (our format + Hugging Face layout).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import checkpoint
import data
import rundir
import training
from chunked_loss import head_loss
from cli import DTYPES, DiskFull, Progress, UserError, atomic_dir, autocast, cli_main, parse_config
from eval import WikiText2
from model import Transformer
from sparsity import check_mask, check_nm, nm_mask, prunable_linears
from training import TrainArgs, check_finite


@dataclass
class ASTArgs(TrainArgs):
    """Adaptive Sparse Trainer: retrain a Llama into 2:4 sparsity (defaults: the CPU demonstration)."""
    out: str = "out/train_ast"
    max_steps: int = 30
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 2e-4
    warmup_steps: int = 3
    ckpt_interval: int = 15
    eval_interval: int = 15
    ppl_windows: int = 8
    ppl_seq_len: int = 128
    log_interval: int = 5
    init_mask: str | None = None  # a sparsity.py checkpoint dir whose 2:4 masks start the run; default |W|
    mask_interval: int = 10  # optimizer steps between mask updates (Δt); 0: a fixed mask
    decay_max: float = 1e-4  # λ_max of the annealed decay on pruned weights; 0 disables
    decay_warmup: int | None = None  # T0, steps until λ reaches λ_max; default max_steps // 4
    decay_form: Literal["adamw", "grad"] = "adamw"  # adamw: the paper's form; grad: added to the gradient (official LLaMA code)
    alpha: float = 0.67  # distillation weight: α·T²·KL + (1 − α)·CE; 0 = no teacher
    temperature: float = 2.0  # distillation temperature T
    kl: Literal["forward", "reverse"] = "forward"  # forward: KL(teacher ‖ student); reverse: KL(student ‖ teacher)
    slorb_k: int = 0  # SLoRB group size (the paper: 16); 0 = no SLoRB
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # teacher weights; auto: bfloat16 on GPU, the compute dtype on CPU
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~30% more time
    fsdp: bool = False  # shard weights, grads and optimizer over the torchrun processes (fully_shard)
    beta2: float = 0.95  # Adam β2


# -----------------------------------------------------------------------------
# the sparse layer: W ⊙ M forward, straight-through backward, optional SLoRB


class MaskedLinear(torch.autograd.Function):
    """y = x (W ⊙ M)ᵀ forward; backward grad_x = g (W ⊙ M) and grad_W = gᵀx, straight through to the dense W
    (STE). Saves x, W and M themselves: W ⊙ M exists, in x's dtype, only while a matmul needs it."""

    @staticmethod
    def forward(ctx, x, weight, mask):
        ctx.save_for_backward(x, weight, mask)
        return F.linear(x, weight.to(x.dtype, copy=True).mul_(mask))

    @staticmethod
    def backward(ctx, g):
        x, weight, mask = ctx.saved_tensors
        grad_x = g @ weight.to(g.dtype, copy=True).mul_(mask) if ctx.needs_input_grad[0] else None
        grad_w = (g.flatten(0, -2).mT @ x.flatten(0, -2)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


class SparseLinear(nn.Linear):
    """y = (W ⊙ M) x [+ S (X x)]. Shares the dense layer's weight Parameter, so state-dict names don't change;
    the mask is a non-persistent buffer (it is saved by the trainer and by checkpoint.save(masks=))."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor, slorb_k: int = 0):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.slorb_k = linear.in_features, linear.out_features, slorb_k
        self.weight, self.bias = linear.weight, None
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)
        if slorb_k:
            self.slorb_x, self.slorb_s = (nn.Parameter(t) for t in slorb_init(linear.weight.detach(), mask, slorb_k))

    def forward(self, x):
        on = torch.is_autocast_enabled(x.device.type)  # autocast's dtype for the matmul, as F.linear would take
        y = MaskedLinear.apply(x.to(torch.get_autocast_dtype(x.device.type) if on else self.weight.dtype),
                               self.weight, self.mask)
        if self.slorb_k:
            y = y + F.linear(F.linear(x, self.slorb_x), self.slorb_s)
        return y


def slorb_init(weight, mask, k):
    """SLoRB (the paper's SLoRB): X sums each group of k inputs; S[i, j] is the mean of the pruned weights of row i
    in group j, so each group's total weight is unchanged right after pruning. Returns (X, S)."""
    out_dim, in_dim = weight.shape
    if in_dim % k:
        raise UserError(f"--slorb-k {k} does not divide the input dim {in_dim}; choose a divisor (e.g. 16)")
    x = torch.zeros(in_dim // k, in_dim, dtype=weight.dtype, device=weight.device)
    x.view(in_dim // k, in_dim // k, k).diagonal(dim1=0, dim2=1).fill_(1.0)  # row j: ones at columns jk..jk+k-1
    s = (weight * ~mask).view(out_dim, in_dim // k, k).sum(-1) / k
    return x, s


def sparsify(model: nn.Module, masks: dict, slorb_k: int = 0) -> dict:
    """Swap the seven projections of every block for SparseLinear; returns {name: SparseLinear}."""
    layers = {}
    for name, linear in prunable_linears(model).items():
        parent_name, attr = name.rsplit(".", 1)
        layer = SparseLinear(linear, masks[name].to(linear.weight.device), slorb_k)
        setattr(model.get_submodule(parent_name), attr, layer)
        layers[name] = layer
    return layers


@torch.no_grad()
def update_masks(layers: dict, init_masks: dict) -> tuple[float, float]:
    """Recompute every mask from |W| (the paper's adaptive masks, every Δt steps) on the weights' device. Under FSDP
    each rank masks the rows it holds (2:4 groups run along a row) and the masks are gathered as packed bits, not
    the weights. init_masks: bool masks or training.pack_bits of them. Returns the flip rates vs the previous and the
    initial masks, counted on the device and read once."""
    counts, total = 0, 0
    for name, layer in layers.items():
        rows = nm_mask(training.local(layer.weight).abs().float(), 2, 4, name=name)
        mask = rows if rows.shape == layer.mask.shape else training.unpack_bits(
            training.gather_rows(training.pack_bits(rows), layer.weight), layer.in_features)
        init = init_masks[name]
        init = init if init.dtype == torch.bool else training.unpack_bits(init, layer.in_features)
        counts = counts + torch.stack([(mask != layer.mask).sum(), (mask != init).sum()])
        total += mask.numel()
        layer.mask.copy_(mask)  # in place: the optimizer holds references to these tensors
    flipped, flipped_init = counts.tolist()
    return flipped / total, flipped_init / total


# -----------------------------------------------------------------------------
# optimizer: AdamW plus the annealed decay on pruned weights (ARS-STE)


class ARSAdamW(torch.optim.Optimizer):
    """AdamW whose masked parameters also get the decay λ(t)·(¬M ⊙ W), λ set per step in group["mask_decay"]
    (the paper's ARS-STE).

    form "adamw" (the paper's, and the official GPT-2 optimizer's, for every masked parameter):
        m = β1 m + (1−β1) g,   u = m + λ¬M⊙W,   v = β2 v + (1−β2) u²,
        W ← W − lr · (u / (1−β1^t)) / (√(v / (1−β2^t)) + ε)
      so the decay stays out of the first moment but joins the step and the second moment;
    form "grad" (official LLaMA code, SR-STE): g ← g + λ¬M⊙W, then a standard AdamW step.
    Parameters without a mask (embeddings, norms, SLoRB) take a standard AdamW step. Decoupled weight decay
    as in AdamW, per param group (make_optimizer: matrices only). Under FSDP the moments are DTensors sharded like
    their parameter (a gathered state dict has full shapes); the arithmetic runs on the local shards. Masks are
    torch.bool, so ¬M is logical NOT (the official GPT-2 code used ~ on an int tensor, which is −1/−2, and pushed
    every weight away from zero)."""

    def __init__(self, params, masks: dict, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, form="adamw"):
        if form not in ("adamw", "grad"):
            raise UserError(f"--decay-form {form!r}: use adamw (the paper's) or grad (the official LLaMA code's)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mask_decay=0.0))
        self.masks, self.form = masks, form  # {param: bool mask}, updated in place by update_masks

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (beta1, beta2), lr, eps, lam = group["betas"], group["lr"], group["eps"], group["mask_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # zeros_like(p): a DTensor like p under FSDP, never a bare local shard
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"].item()
                w, g, m, v = (training.local(x) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
                masked = p in self.masks
                decay = lam * w * ~training.local_rows(self.masks[p], p) if masked and lam else 0.0  # pulls pruned W to 0
                if masked and self.form == "adamw":
                    m.lerp_(g, 1 - beta1)
                    update = second = m + decay  # u: in the step and the second moment, not in m
                else:
                    g = g + decay
                    m.lerp_(g, 1 - beta1)
                    update, second = m, g
                v.mul_(beta2).addcmul_(second, second, value=1 - beta2)
                w.mul_(1 - lr * group["weight_decay"])
                w.addcdiv_(update, (v / (1 - beta2 ** t)).sqrt_().add_(eps), value=-lr / (1 - beta1 ** t))


def decay_at(step: int, args) -> float:
    """λ(t) = λ_max · min(t / T0, 1) for the optimizer step t = step + 1."""
    t0 = args.decay_warmup if args.decay_warmup is not None else max(1, args.max_steps // 4)
    return args.decay_max * min((step + 1) / max(1, t0), 1.0)


# -----------------------------------------------------------------------------
# loss


def ast_loss(student, teacher, x, y, args, dtype):
    """α·T²·KL(teacher ‖ student) + (1 − α)·CE, the paper's distillation loss (--kl reverse: KL(student ‖ teacher));
    KL summed over the vocabulary and averaged over tokens; plain CE without a teacher. The LM heads run a chunk of
    tokens at a time on the final hidden states (chunked_loss.py): no (tokens, vocab) logits.
    Returns (loss, ce, kl or None)."""
    hidden = student(x, return_hidden=True)
    t_hidden = t_head = None
    if teacher is not None and args.alpha > 0:
        with torch.no_grad():
            t_hidden = teacher(x, return_hidden=True)
        t_head = teacher.output.weight
    head = getattr(student, "module", student).output.weight  # DDP wraps; FSDP's root stays unsharded to backward
    return head_loss(hidden, head, y, t_hidden, t_head, args.alpha, args.temperature, args.kl, dtype)


def train_step(student, teacher, optimizer, batches, step, args, device, dtype, world_size=1, last_ckpt=None):
    """One optimizer step: grad_accum micro-batches, clipping, λ(t) and lr for this step.
    Returns the loss parts (averaged over micro-batches and ranks) as floats."""
    for group in optimizer.param_groups:
        group["lr"], group["mask_decay"] = training.lr_at(step, args), decay_at(step, args)
    parts = torch.zeros(3, device=device)
    for micro in range(args.grad_accum):
        x, y = (t.to(device) for t in batches.next())
        with training.grad_sync(student, micro == args.grad_accum - 1), autocast(dtype, device):
            loss, ce, kl = ast_loss(student, teacher, x, y, args, dtype)
        (loss / args.grad_accum).backward()
        parts += torch.stack([loss.detach(), ce.detach(), kl.detach() if kl is not None else ce.new_zeros(())])
    parts /= args.grad_accum
    if world_size > 1:
        dist.all_reduce(parts)
        parts /= world_size
    loss, ce, kl = parts.tolist()
    check_finite(loss, step + 1, last_ckpt)  # before the step: weights stay good
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "ce": ce, "kl": kl if teacher is not None and args.alpha > 0 else None}


# -----------------------------------------------------------------------------
# the run: models, masks, state, export


def make_optimizer(student, layers: dict, args) -> ARSAdamW:
    """ARSAdamW with --weight-decay on the model's weight matrices (projections, embeddings, LM head) only: not on
    norm gains, nor on SLoRB's X (a 0/1 group sum) and S (the pruned weights' compensation) — decay would pull the
    branch toward plain pruning. The official GPT-2 code decays every 2-D tensor, its SLoRB included."""
    groups = training.decay_groups(student, args.weight_decay, skip=("slorb_",))
    return ARSAdamW(groups, {layer.weight: layer.mask for layer in layers.values()}, lr=args.lr,
                    betas=(0.9, args.beta2), form=args.decay_form)


def load_models(args, device, dtype):
    """(student, teacher or None, tokenizer). The student starts from --init-mask's weights when given (a one-shot
    checkpoint: SparseGPT's reconstructed weights, not only its masks), else from --ckpt; the teacher is always
    the frozen dense --ckpt, bf16 on GPU, no grads."""
    where = "cpu" if args.fsdp else device
    student, tokenizer = checkpoint.load(args.init_mask or args.ckpt, device=where)
    teacher = None
    if args.alpha > 0:
        t_dtype = DTYPES[args.teacher_dtype] if args.teacher_dtype != "auto" else (
            torch.bfloat16 if device.type == "cuda" else dtype)
        teacher, _ = checkpoint.load(args.ckpt, device=where, dtype=t_dtype, tokenizer=False)
        teacher.eval().requires_grad_(False)
        if args.init_mask and teacher.args != student.args:
            raise UserError(f"--init-mask {args.init_mask} is not a pruned copy of --ckpt {args.ckpt} "
                            f"(model configs differ); prune --ckpt with sparsity.py and pass that --out")
    return student, teacher, tokenizer


def initial_masks(args, student) -> dict:
    """--init-mask's 2:4 masks (a sparsity.py checkpoint), else magnitude 2:4 of the dense weights."""
    linears = prunable_linears(student)
    if not args.init_mask:
        return {name: nm_mask(lin.weight.detach().abs().float(), 2, 4, name=name) for name, lin in linears.items()}
    masks = checkpoint.load_masks(args.init_mask)
    if not masks or set(masks) != set(linears):
        raise UserError(f"--init-mask {args.init_mask}: needs masks for all {len(linears)} projections "
                        f"(a sparsity.py checkpoint with --sparsity 2:4)")
    if not all(check_mask(m, (2, 4)) for m in masks.values()):
        raise UserError(f"--init-mask {args.init_mask}: masks are not 2:4 (prune with --sparsity 2:4)")
    return masks


def restore(resumed, student, layers, init_masks, batches) -> int:
    """Weights, masks and data position from a state.pt (the optimizer and RNG follow once they exist)."""
    student.load_state_dict(resumed["model"])
    for name, layer in layers.items():
        layer.mask.copy_(resumed["masks"][name])
        init_masks[name].copy_(resumed["init_masks"][name])
    batches.load_state_dict(resumed["batches"])
    return resumed["step"]


STATE_KEYS = ("step", "model", "optimizer", "masks", "init_masks", "batches", "rng")  # what restore() reads


def save_checkpoint(student, optimizer, layers, init_masks, batches, step, args, master, **extra):
    """Everything a resume needs, written atomically by rank 0: weights, masks, optimizer, data, RNG."""
    model_state = training.model_state(student, args.fsdp)
    optim_state = training.optimizer_state(student, optimizer, args.fsdp)
    if master:
        training.save_state(Path(args.out) / "state.pt", {
            "step": step, "model": model_state, "optimizer": optim_state,
            "masks": {n: l.mask.cpu() for n, l in layers.items()}, "init_masks": {n: m.cpu() for n, m in init_masks.items()},
            "batches": batches.state_dict(), "rng": training.rng_state(), **rundir.run_record(args, "train_ast"),
            **extra})


def export(student_state: dict, model_args, masks: dict, tokenizer, out_dir, slorb_k, dtype, meta, hf=True):
    """Bake W ⊙ M (exact zeros) into a plain Transformer and save it in our format (+ HF layout)."""
    final = Transformer(replace(model_args, slorb_k=slorb_k) if slorb_k else model_args)
    state = dict(student_state)
    for name, mask in masks.items():
        state[name + ".weight"] = state[name + ".weight"] * mask.to(state[name + ".weight"].device)
    final.load_state_dict(state)
    final = final.to(dtype)
    for name, mask in masks.items():
        assert check_nm(final.get_submodule(name).weight, 2, 4), name
    checkpoint.save(final, tokenizer, out_dir, masks={k: v.cpu() for k, v in masks.items()}, meta=meta)
    if hf and not slorb_k:
        checkpoint.export_hf(final, tokenizer, Path(out_dir) / "hf")
    elif hf:
        print("no Hugging Face export with SLoRB: transformers' Llama has no SLoRB branch (our format has it)")
    return final


def finish(model_state, model_args, layers, tokenizer, wikitext, args, dtype, results, tokens_per_step):
    """Rank 0: the export (exact 2:4 zeros, our format + HF layout) and the plot, then final/ appears whole (an
    interrupted export leaves none, and --resume exports again); the numbers."""
    out = Path(args.out)
    meta = {"method": "ast", "sparsity": "2:4", "steps": args.max_steps, "tokens": tokens_per_step * args.max_steps,
            **results, "args": asdict(args)}

    def write(final):
        export(model_state, model_args, {name: layer.mask.cpu() for name, layer in layers.items()}, tokenizer,
               final, args.slorb_k, dtype, meta)
        training.plot_log(out / "log.jsonl", out / "log.png", ["loss", "ce", "kl", "ppl", "flip_prev", "flip_init",
                                                               "lam"],
                          refs={"ppl": {"dense": results["dense_ppl"], "one-shot 2:4": results["oneshot_ppl"]}})
    try:
        atomic_dir(out / "final", write)
    except DiskFull as e:
        raise DiskFull(f"{e.failed}, exporting {out / 'final'}", f"{out / 'state.pt'} keeps the trained model: free "
                       f"some space and run again with --resume to export it") from None
    print(f"saved {out / 'final'} (our format{'' if args.slorb_k else ' + hf/'}), log {out / 'log.jsonl'}, "
          f"plot {out / 'log.png'}")
    if wikitext is not None:
        f = lambda x: x and f"{x:.2f}"  # noqa: E731
        print(f"{wikitext.describe()}: dense {f(results['dense_ppl'])} | one-shot 2:4 {f(results['oneshot_ppl'])} | "
              f"AST {args.max_steps} steps {f(results['ast_ppl'])}")


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = parse_config(ASTArgs, argv)
    if args.init_mask and not Path(args.init_mask).is_dir():
        raise UserError(f"--init-mask {args.init_mask}: no such directory; give the --out of a sparsity.py run with "
                        f"--sparsity 2:4, or leave --init-mask out for magnitude masks")
    rank, world_size, _, device = training.setup_distributed(args.device)
    master, out = rank == 0, Path(args.out)
    say = print if master else (lambda *a, **k: None)
    resumed = rundir.open_run(args, "train_ast", STATE_KEYS, {"--ckpt": args.ckpt, "--init-mask": args.init_mask}, rank)
    if rundir.finished(args, resumed):
        return training.teardown()
    torch.manual_seed(args.seed)
    dtype = training.autocast_dtype(args.autocast, device)

    student, teacher, tokenizer = load_models(args, device, dtype)
    masks = initial_masks(args, student)
    # only for the flip rate: packed bits on the device (0.8 GB at 7B, not a 6.5 GB host copy per update)
    init_masks = {name: training.pack_bits(m).to(device) for name, m in masks.items()}
    layers = sparsify(student, masks, args.slorb_k)
    data_dir = data.resolve_data_dir(args.data_dir)
    batches = data.training_batches("text", data_dir, tokenizer, args.seq_len, args.batch_size, args.seed,
                                    rank, world_size)
    wikitext = WikiText2(tokenizer, data_dir, args.ppl_seq_len, args.ppl_windows) if args.eval else None
    start_step = restore(resumed, student, layers, init_masks, batches) if resumed is not None else 0
    rundir.clear_run(args, rank)  # --overwrite: only now that everything the run reads has loaded

    if args.activation_checkpointing:
        for block in student.layers:
            block.forward = functools.partial(activation_checkpoint, block.forward, use_reentrant=False)
    train_model = training.wrap(student, device, world_size, fsdp=args.fsdp, compile=args.compile, dtype=dtype)
    if args.fsdp and teacher is not None:  # the teacher is as big as the student
        training.fsdp_shard(teacher, device, world_size)
    optimizer = make_optimizer(student, layers, args)  # after wrap: FSDP's parameters are its sharded DTensors
    if resumed is not None:
        training.load_optimizer_state(student, optimizer, resumed["optimizer"], args.fsdp)
        training.set_rng_state(resumed["rng"])

    def ppl(model):
        return wikitext(model, dtype) if wikitext is not None else None

    log = training.JsonlLog(out / "log.jsonl")
    if resumed is None:  # the two reference lines: the dense teacher and the one-shot 2:4 start
        dense_ppl, oneshot_ppl = ppl(teacher) if teacher is not None else None, ppl(student)
        if wikitext is not None:
            say(f"{wikitext.describe()}: dense {dense_ppl and f'{dense_ppl:.2f}'} | one-shot 2:4 {oneshot_ppl:.2f}")
        if master:
            log.log({"step": 0, "ppl": oneshot_ppl, "dense_ppl": dense_ppl, "flip_prev": 0.0, "flip_init": 0.0})
    else:
        dense_ppl, oneshot_ppl = resumed.get("dense_ppl"), resumed.get("oneshot_ppl")

    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len * world_size
    say(f"AST: {len(layers)} sparse layers, {tokens_per_step} tokens/step, {args.max_steps} steps, "
        f"{device.type} {str(dtype).removeprefix('torch.')}, alpha {args.alpha}, decay {args.decay_form} "
        f"λ_max {args.decay_max}, slorb_k {args.slorb_k}, {world_size} process(es){' FSDP' if args.fsdp else ''}")
    progress = Progress("step", args.max_steps, start=start_step)
    last_ckpt = str(out / "state.pt") if resumed is not None else None
    flips, last_ppl = (resumed or {}).get("flips", (0.0, 0.0)), (resumed or {}).get("last_ppl")
    with training.StopRequest() as stop:
        for step in range(start_step, args.max_steps):
            parts = train_step(train_model, teacher, optimizer, batches, step, args, device, dtype, world_size, last_ckpt)
            done = step + 1
            record = {"step": done, **parts, "lr": training.lr_at(step, args), "lam": decay_at(step, args)}
            if args.mask_interval and done % args.mask_interval == 0 and done < args.max_steps:  # never after the last step: only trained masks are exported
                flips = update_masks(layers, init_masks)
                record.update(flip_prev=flips[0], flip_init=flips[1])
            if wikitext is not None and (args.eval_interval and done % args.eval_interval == 0 or done == args.max_steps):
                record["ppl"] = last_ppl = ppl(student)
            if master:
                log.log(record)
            if done % args.log_interval == 0 or done == args.max_steps or done == start_step + 1:
                say(progress.line(done, tokens_per_step * (done - max(start_step, done - args.log_interval)),
                                  **parts, lr=record["lr"], lam=record["lam"], flip=flips[0], flip_init=flips[1],
                                  ppl=record.get("ppl")))
            stopping = stop.requested(device)
            if args.ckpt_interval and done % args.ckpt_interval == 0 or done == args.max_steps or stopping:
                save_checkpoint(student, optimizer, layers, init_masks, batches, done, args, master,
                                dense_ppl=dense_ppl, oneshot_ppl=oneshot_ppl, flips=flips, last_ppl=last_ppl)
                last_ckpt = str(out / "state.pt")
            if stopping and done < args.max_steps:
                stop.stop(done, args)

    model_state = training.model_state(student, args.fsdp)  # FSDP: a collective, every rank takes part
    results = {"dense_ppl": dense_ppl, "oneshot_ppl": oneshot_ppl, "ast_ppl": last_ppl}
    if master:
        finish(model_state, student.args, layers, tokenizer, wikitext, args, dtype, results, tokens_per_step)
    training.teardown()
    return results


if __name__ == "__main__":
    cli_main(main)
