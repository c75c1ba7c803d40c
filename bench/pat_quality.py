"""PAT vs the two baselines on SmolLM2-135M at the same pruning ratio and the same training tokens.

    python bench/pat_quality.py --max-steps 300 --batch-size 8 --seq-len 256     # a real comparison (GPU)
    python bench/pat_quality.py --max-steps 16 --batch-size 2 --seq-len 128      # what a busy 2-core CPU allows

Arms (all train LoRA on the seven projections with identical flags, data, steps, batch and seq_len):
- `lora`:       dense LoRA fine-tuning (train_pat --ratio 0), the unpruned reference;
- `prune_lora`: prune, then fine-tune: drop the hidden channels with the lowest residual-stream norm
                (RMS of the residual stream at every RMSNorm input over calibration windows of the
                training text), delete them with train_pat.merge (a hard mask, no training), then LoRA;
- `pat`:        train_pat --ratio R (mask learnt while tuning, then merged).
Each arm's WikiText-2 perplexity is that of its final merged checkpoint, on the same windows.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import data  # noqa: E402
import train_pat  # noqa: E402
from checkpoint import load  # noqa: E402


@torch.no_grad()
def residual_channel_norms(model, windows):
    """Sum over every RMSNorm input (the residual stream before each block half and at the end) of x^2 per channel."""
    total = torch.zeros(model.args.dim)
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]

    def hook(module, inputs):
        total.add_(inputs[0].float().pow(2).sum((0, 1)).cpu())
    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        for w in windows:
            model(w[None])
    finally:
        for h in handles:
            h.remove()
    return total.sqrt()


def prune_lowest_norm(ckpt, out_dir, ratio, width_multiple, calib_ids, seq_len, n_windows):
    model, tokenizer = load(ckpt)
    windows = [torch.from_numpy(calib_ids[i * seq_len:(i + 1) * seq_len].astype("int64")) for i in range(n_windows)]
    norms = residual_channel_norms(model, windows)
    pat = train_pat.PAT(model, ratio=ratio, width_multiple=width_multiple, milestone=1, hsm_rank=0, lora_rank=0)
    keep = torch.zeros(model.args.dim, dtype=torch.bool)
    keep[norms.topk(pat.n_open).indices] = True
    pat.set_hard_mask(keep)
    merged = train_pat.merge(pat)
    checkpoint.save(merged, tokenizer, out_dir, meta={"method": "lowest residual-norm channels", "ratio": ratio})
    return merged, tokenizer


def final_ppl(out_dir):
    records = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
    first = next(r["ppl"] for r in records if "ppl" in r)
    return first, records[-1]["ppl_merged"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m")
    p.add_argument("--out", default="out/pat_quality")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--data", default="text")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--arms", default="lora,prune_lora,pat")
    a = p.parse_args()
    out = Path(a.out)
    common = ["--data", a.data, "--max-steps", str(a.max_steps), "--batch-size", str(a.batch_size),
              "--seq-len", str(a.seq_len), "--lr", str(a.lr), "--ppl-windows", str(a.ppl_windows),
              "--ppl-seq-len", str(a.ppl_seq_len), "--warmup-steps", str(max(1, a.max_steps // 10)),
              "--log-interval", "1"] + (["--data-dir", a.data_dir] if a.data_dir else [])
    rows = {}
    for arm in a.arms.split(","):
        print(f"\n=== {arm} ===", flush=True)
        if arm == "lora":
            train_pat.main(common + ["--ckpt", a.ckpt, "--ratio", "0", "--out", str(out / arm)])
        elif arm == "pat":
            train_pat.main(common + ["--ckpt", a.ckpt, "--ratio", str(a.ratio), "--out", str(out / arm)])
        elif arm == "prune_lora":
            _, tokenizer = load(a.ckpt, tokenizer=True)
            data_dir = data.resolve_data_dir(a.data_dir)
            files = data.default_text_files(data_dir) if a.data == "text" else [Path(f) for f in a.data.split(",")]
            calib = data.tokenize_corpus(files, tokenizer)
            prune_lowest_norm(a.ckpt, out / "pruned", a.ratio, 8, calib, a.seq_len, a.calib_windows)
            train_pat.main(common + ["--ckpt", str(out / "pruned"), "--ratio", "0", "--out", str(out / arm)])
        else:
            raise SystemExit(f"unknown arm {arm}")
        rows[arm] = final_ppl(out / arm)
    tokens = a.max_steps * a.batch_size * a.seq_len
    print(f"\nSmolLM2-135M, ratio {a.ratio}, {a.max_steps} steps x {a.batch_size} x {a.seq_len} = {tokens:,} "
          f"training tokens per arm ({a.data}); WikiText-2 test, {a.ppl_windows or 'all'} windows of {a.ppl_seq_len}")
    names = {"lora": "LoRA only, dense (0%)", "prune_lora": f"prune lowest-norm channels -> LoRA ({a.ratio:.0%})",
             "pat": f"PAT ({a.ratio:.0%})"}
    print("| method | ppl before training | ppl of the final model |\n|---|---|---|")
    for arm, (before, after) in rows.items():
        print(f"| {names[arm]} | {before:.2f} | {after:.2f} |")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
