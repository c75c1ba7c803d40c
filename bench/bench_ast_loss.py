"""Peak extra memory of AST's loss, CE + KL with its backward, on CPU: whole fp32 logits (the loss as first written,
chunked_loss.reference_loss on the heads' logits) against chunked_loss.head_loss (a chunk of tokens at a time).

    OMP_NUM_THREADS=1 python bench/bench_ast_loss.py   # vocab 128,256, dim 1024: ~17 min on one thread, < 6 GB RSS

Each (variant, tokens) runs in a fresh subprocess holding the student's and teacher's final hidden states (tokens,
dim), their LM heads (vocab, dim) and the targets. Extra memory = the process's peak RSS during forward + backward
(VmHWM, reset through /proc/self/clear_refs just before) minus its RSS just before: the loss's intermediates plus the
gradients of the hidden states and the head, which both variants produce. torch's CPU tensors come from malloc,
which tracemalloc does not see; MALLOC_MMAP_THRESHOLD_ makes glibc map every block over 1 MB on its own and unmap it
when freed, so the RSS follows the live tensors. Whole logits at 2 x 4096 tokens do not fit this machine (one fp32
copy is 4.2 GB): they are measured at fewer tokens and extrapolated linearly (they are linear in tokens), and printed
as such; the chunked loss is measured at 2 x 4096 itself.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from chunked_loss import CHUNK, head_loss, reference_loss  # noqa: E402

GB = 1e9


def kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def loss_and_backward(variant, h, w, th, tw, y, args):
    if variant == "whole":  # as before: the model returned fp32 logits (B·T·V), the loss worked on them whole
        logits = F.linear(h, w).float()
        with torch.no_grad():
            t_logits = F.linear(th, tw).float()
        loss = reference_loss(logits, y, t_logits, args.alpha, args.temperature, args.kl)[0]
    else:
        loss = head_loss(h, w, y, th, tw, args.alpha, args.temperature, args.kl, chunk=args.chunk)[0]
    loss.backward()
    return float(loss)


def child(args):
    """One measurement in this process: prints {"extra_gb", "seconds", "loss"} as JSON."""
    g = torch.Generator().manual_seed(0)
    n, d, V = args.tokens, args.dim, args.vocab
    h = torch.randn(2, n // 2, d, generator=g).requires_grad_()  # 2 sequences
    w = (torch.randn(V, d, generator=g) * d ** -0.5).requires_grad_()
    th, tw = torch.randn(2, n // 2, d, generator=g), torch.randn(V, d, generator=g) * d ** -0.5
    y = torch.randint(0, V, (2, n // 2), generator=g)
    warm = (h[:, :4].detach().requires_grad_(), w[:64].detach().requires_grad_(), th[:, :4], tw[:64], y[:, :4] % 64)
    loss_and_backward(args.variant, *warm, args)  # kernels and thread pools start off the books
    before = kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start = time.perf_counter()
    loss = loss_and_backward(args.variant, h, w, th, tw, y, args)
    seconds = time.perf_counter() - start
    print(json.dumps({"extra_gb": (kb("VmHWM") - before) * 1024 / GB, "seconds": seconds, "loss": loss}))


def measure(variant, tokens, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--tokens", str(tokens), "--dim", str(args.dim),
           "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--kl", args.kl]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--dim", type=int, default=1024)  # the heads are (vocab, dim): 0.5 GB each in fp32 at 1024
    p.add_argument("--tokens", type=int, default=2 * 4096)  # the target: 2 sequences of 4096
    p.add_argument("--whole-tokens", type=int, nargs="+", default=[512, 1024])  # whole logits fit only this small
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--kl", default="forward", choices=["forward", "reverse"])
    p.add_argument("--alpha", type=float, default=0.67)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["whole", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    print(f"AST loss (CE + {args.kl} KL, alpha {args.alpha}, T {args.temperature}) forward + backward on CPU, fp32, "
          f"vocab {args.vocab}, dim {args.dim}, chunk {args.chunk} tokens; torch {torch.__version__}")
    print(f"{'variant':<8} {'tokens':>6} {'extra peak GB':>14} {'GB per 1k tokens':>17} {'seconds':>8} {'loss':>9}")
    rows = {}
    for variant, n in [*(("whole", n) for n in args.whole_tokens), ("chunked", args.whole_tokens[-1]),
                       ("chunked", args.tokens)]:
        r = rows[variant, n] = measure(variant, n, args)
        print(f"{variant:<8} {n:>6} {r['extra_gb']:>14.2f} {r['extra_gb'] / n * 1000:>17.2f} {r['seconds']:>8.2f} "
              f"{r['loss']:>9.5f}")
    # whole logits: a + b·tokens through the two smallest measurements, evaluated at the target
    (n0, n1) = args.whole_tokens[:2]
    slope = (rows["whole", n1]["extra_gb"] - rows["whole", n0]["extra_gb"]) / (n1 - n0)
    whole = rows["whole", n1]["extra_gb"] + slope * (args.tokens - n1)
    chunked = rows["chunked", args.tokens]["extra_gb"]
    same = rows["chunked", n1]["extra_gb"] / rows["whole", n1]["extra_gb"]
    print(f"whole logits at {args.tokens} tokens, extrapolated: {whole:.1f} GB ({slope * 1000:.2f} GB per 1k tokens, "
          f"{slope * GB / args.vocab / 4:.1f} fp32 (tokens, vocab) tensors)")
    print(f"chunked / whole at {args.tokens} tokens: {chunked:.2f} / {whole:.1f} GB = 1/{whole / chunked:.1f}"
          f" (measured / extrapolated); at {n1} tokens, both measured: 1/{1 / same:.1f}")


if __name__ == "__main__":
    main()
