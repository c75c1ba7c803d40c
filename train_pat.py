"""Pruning-Aware Tuning (PAT, Liu et al., AAAI 2025, arXiv 2408.14721), the training script: fine-tune a Llama
with LoRA while the shared hidden-channel mask of pat.py learns which channels to drop, merge everything into a
plain, narrower Llama (dim d -> d') in <out>/final/, and train on the same tokens the baseline PAT must beat.

    python train_pat.py                # CPU demo on SmolLM2-135M, 25%: dense / one-shot prune / prune then LoRA / PAT
    python train_pat.py --ckpt llama2-7b --data instruct/lamini-10k.jsonl --mask-init zeros --max-steps 30000 \
        --milestone 10000 --batch-size 8 --grad-accum 16 --seq-len 256 --lr 5e-5 --mask-lr 5e-5 --warmup-steps 100 \
        --grad-clip 0.3 --hsm-rank 200 --lora-rank 20 --lora-alpha 4 --ppl-windows 0 --baseline prune  # paper's recipe
    torchrun --nproc_per_node 8 train_pat.py --ckpt llama2-7b ...

Loss: task + count_weight * |#{w >= 0} - N| / N + polar_weight * polarisation + identity_weight * Identity Loss.
The mask is soft until 0.8 s0, frozen from there (official code), hard top-N from s0 (the milestone). With
--baseline lora (the default) the one-shot prune of the lowest-norm channels at the same width is then LoRA-tuned
with the same steps, tokens and flags in <out>/prune_lora/, and the closing table shows both.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import data
import rundir
import training
from cli import DiskFull, Progress, UserError, atomic_dir, autocast, cli_main, parse_config
from eval import WikiText2
from pat import (PAT, count_params, init_mask_from_norms, mask_schedule, merge, prune_channels,
                 residual_channel_norms, target_width, top_n)
from training import TrainArgs


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
    baseline: Literal["lora", "prune", "none"] = "lora"  # prune: also the one-shot prune of the lowest-norm channels at
    # PAT's width, on the same windows; lora: that prune then LoRA-tuned with the same steps, tokens, flags (<out>/prune_lora)
    count_weight: float = 10.0  # weight of the count loss |#open - N| / N (official code: 10)
    polar_weight: float = 1.0  # weight of the polarisation term that pushes logits to +-0.5 (official code: 1)
    identity_weight: float = 1.0  # lambda_id: Identity Loss summed over all HSMs (the paper); 1/(2L+1): the mean
    hsm_rank: int = 8  # r of each HSM (paper: 200 for d = 4096)
    lora_rank: int = 8  # LoRA on all seven projections (paper: 20)
    lora_alpha: float = 16.0  # LoRA scale alpha (the update is alpha / r * B A)
    keep_tied: bool = True  # tied embeddings: mask-only embedding HSM so the merged model stays tied



STATE_KEYS = ("step", "pat", "optimizer", "data", "rng")  # what a resume reads


def milestone_of(args) -> int:
    """s0: --milestone, or a third of the steps (the paper's)."""
    return args.milestone or max(1, args.max_steps // 3)


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
    training.check_finite(loss.detach(), step + 1, last_ckpt)
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


def finish(pat, model, tokenizer, wikitext, args, step, log, refs) -> dict:
    """Merge into the narrower Llama, save it to <out>/final/ with its perplexities in meta.json; return that meta."""
    out, merged = Path(args.out), merge(pat.eval())
    ppl_tuned, ppl_merged = (wikitext(model), wikitext(merged)) if wikitext else (None, None)
    n_before, n_after = count_params(model), count_params(merged)
    print(f"merged: dim {pat.dim} -> {merged.args.dim}, parameters {n_before:,} -> {n_after:,} "
          f"({100 * (1 - n_after / n_before):.1f}% fewer)")
    log.keep_until(step, drop=lambda record: "ppl_merged" in record)  # an export interrupted before this one
    log.log({"step": step, "ppl": ppl_tuned, "ppl_merged": ppl_merged})
    meta = {"method": "pat", "ratio": args.ratio, "source": args.ckpt, "steps": step, "mask_init": args.mask_init,
            "dim": merged.args.dim, "ppl_wikitext2": ppl_merged, "ppl_unmerged": ppl_tuned,
            "ppl_protocol": wikitext.describe() if wikitext else None, "ppl_windows": args.ppl_windows,
            "ppl_seq_len": args.ppl_seq_len, "refs": refs}

    def write(final):  # weights and plot: final/ appears whole, last (an interrupted export leaves none to resume)
        checkpoint.save(merged, tokenizer, final, meta=meta)
        training.plot_log(log.path, out / "log.png", ["loss", "task", "count_loss", "identity", "open", "tau", "ppl",
                                                      "lr"],
                          log_keys=("ppl", "tau"), refs={"ppl": {"before tuning": refs.get("dense"), "merged": ppl_merged}},
                          marks={f"milestone s0 = {pat.milestone}": pat.milestone} if pat.prunes else None)
    try:
        atomic_dir(out / "final", write)
    except DiskFull as e:
        raise DiskFull(f"{e.failed}, exporting {out / 'final'}", f"{out / 'state.pt'} keeps the trained adapters: free "
                       f"some space and run again with --resume to merge and export them") from None
    print(f"merged model: {out / 'final'} (python eval.py --ckpt {out / 'final'}); log: {log.path}, plot: {out / 'log.png'}")
    return meta


def calibration_batches(batches, n: int, device):
    """The next n training batches one at a time, with a progress line: a large --calib-batches takes long."""
    progress = Progress("channel norms", n, unit="batches")
    for i in range(n):
        yield batches.next()[0].to(device)
        progress.redraw(i + 1)


def train(args, rank, world_size, device) -> dict | None:
    """One run from --ckpt to <out>/final/: PAT, or with --ratio 0 LoRA alone. Returns final/meta.json on rank 0
    (read back if the run had already finished), None on the other ranks."""
    master, out = rank == 0, Path(args.out)
    milestone = milestone_of(args)
    resumed = rundir.open_run(args, "train_pat", STATE_KEYS, {"--ckpt": args.ckpt}, rank)
    if rundir.finished(args, resumed):
        return json.loads((out / "final" / "meta.json").read_text()) if master else None  # else: merge again
    torch.manual_seed(args.seed)
    amp = training.autocast_dtype(args.autocast, device)

    # on GPU the frozen base is stored in the compute dtype (no fp32 weights cast at every forward); CPU keeps fp32
    model, tokenizer = checkpoint.load(args.ckpt, device=device, dtype=amp if device.type == "cuda" else torch.float32)
    if args.ratio > 0 and target_width(model.args.dim, args.ratio, args.width_multiple) >= model.args.dim:
        raise UserError(f"--ratio {args.ratio} with --width-multiple {args.width_multiple} keeps all {model.args.dim} "
                        f"channels of {args.ckpt}: choose a --width-multiple well below {model.args.dim} (8 is usual) "
                        f"or a larger --ratio")
    data_dir = data.resolve_data_dir(args.data_dir)
    batches = data.training_batches(args.data, data_dir, tokenizer, args.seq_len, args.batch_size, args.seed,
                                    rank, world_size)
    wikitext = WikiText2(tokenizer, data_dir, args.ppl_seq_len, args.ppl_windows) if args.eval else None
    rundir.clear_run(args, rank)  # --overwrite: only now that everything the run reads has loaded
    step, last_ckpt, state_path, refs, norms = 0, None, out / "state.pt", {}, None
    log = training.JsonlLog(out / "log.jsonl")
    if master and wikitext and resumed is None:  # before the hooks: --mask-init rms starts off the dense function
        refs["dense"] = wikitext(model)
        print(f"WikiText-2 perplexity of {args.ckpt} before tuning: {refs['dense']:.3f}")
        log.log({"step": 0, "ppl": refs["dense"]})
    baseline = args.baseline != "none" and wikitext is not None
    if args.ratio > 0 and resumed is None and (args.mask_init == "rms" or baseline):
        start = batches.state_dict()
        norms = residual_channel_norms(model, calibration_batches(batches, args.calib_batches, device))
        batches.load_state_dict(start)  # rewound, so every --mask-init trains on the same batches
        if master and baseline:  # the one-shot prune of the lowest-norm channels at PAT's width, on the same windows
            pruned = prune_channels(model, top_n(norms, target_width(model.args.dim, args.ratio, args.width_multiple)))
            refs["one-shot"] = wikitext(pruned)
            print(f"WikiText-2 perplexity of the one-shot prune of the {model.args.dim - pruned.args.dim} lowest-norm "
                  f"channels (no training): {refs['one-shot']:.3f}")
            if args.baseline == "lora":  # trained after PAT from this checkpoint
                checkpoint.save(pruned, tokenizer, out / "pruned", meta={"method": "one-shot prune, lowest-norm channels"})
            del pruned
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
        what = (f"PAT: dim {pat.dim} -> {pat.n_open} (ratio {args.ratio}), milestone {milestone}, mask frozen from step "
                f"{pat.freeze}, mask init {args.mask_init}{' (ours)' if args.mask_init == 'rms' else ''}"
                if pat.prunes else f"LoRA alone (--ratio 0): dim {pat.dim}")
        print(f"{what}, {sum(p.numel() for p in trainable):,} trainable parameters ({len(pat.lora)} LoRA, "
              f"{len(pat.hsms)} HSMs)")

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
                                                     "rng": training.rng_state(), "refs": refs, "args": asdict(args),
                                                     **rundir.run_record(args, "train_pat")})
                last_ckpt = state_path
            if stopping and step < args.max_steps:
                stop.stop(step, args)
    return finish(pat, model, tokenizer, wikitext, args, step, log, refs) if master else None


def print_table(args, result, baseline):
    """Dense, the one-shot prune, prune-then-LoRA and PAT (or LoRA alone) on the same WikiText-2 windows."""
    name = f"PAT, mask init {args.mask_init}{' (ours)' if args.mask_init == 'rms' else ''}" if args.ratio > 0 else "LoRA"
    refs, steps, dim = result["refs"], result["steps"], result["dim"]
    rows = [("dense", refs.get("dense")), (f"one-shot prune of the lowest-norm channels, dim {dim}", refs.get("one-shot"))]
    if baseline:
        rows.append((f"one-shot prune, then LoRA {baseline['steps']} steps, dim {dim}", baseline["ppl_wikitext2"]))
    rows += [(f"{name}, {steps} steps, unmerged", result["ppl_unmerged"]),
             (f"{name}, merged, dim {dim}", result["ppl_wikitext2"])]
    print(f"\n{result['ppl_protocol']}:\n" + "\n".join(f"  {n:<58} {v:10.2f}" for n, v in rows if v is not None))


def main(argv=None):
    args = parse_config(PATArgs, argv)
    milestone = milestone_of(args)
    if args.ratio > 0 and milestone >= args.max_steps:
        raise UserError(f"--milestone {milestone} must be below --max-steps {args.max_steps}: the mask must end hard")
    for bad, says in ((not 0 < args.freeze_at <= 1, f"--freeze-at {args.freeze_at}: must be in (0, 1]"),
                      (args.calib_batches < 1, f"--calib-batches {args.calib_batches}: must be positive")):
        if bad:
            raise UserError(says)
    rank, world_size, _, device = training.setup_distributed(args.device)
    result, baseline = train(args, rank, world_size, device), None
    out = Path(args.out)
    if args.baseline == "lora" and args.ratio > 0 and args.eval:  # same steps, tokens and flags on the pruned model
        if dist.is_initialized():
            dist.barrier()  # rank 0 wrote <out>/pruned
        if (out / "pruned" / "params.json").exists():
            again = args.resume and (out / "prune_lora" / "state.pt").exists()  # a fresh PAT run starts it afresh
            baseline = train(replace(args, ckpt=str(out / "pruned"), out=str(out / "prune_lora"), ratio=0.0,
                                     baseline="none", resume=again, overwrite=not again), rank, world_size, device)
        elif rank == 0:
            print(f"no {out / 'pruned'}: this run began without --baseline lora, so no prune-then-LoRA to compare")
    if result and result.get("ppl_protocol"):  # none without --eval, or from a run finished by an older version
        print_table(args, result, baseline)
    training.teardown()


if __name__ == "__main__":
    cli_main(main)
