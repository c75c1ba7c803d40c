"""Speed of a PAT-merged (narrower) SmolLM2-135M against the dense one, measured in one run.

    python bench/bench_pat_speed.py                        # CPU, ratio 0.25
    python bench/bench_pat_speed.py --final out/pat/final  # time a trained merged model instead
    python bench/bench_pat_speed.py --device cuda --dtype bfloat16

Without --final the merged model comes from `pat.prune_channels` (a hard mask merged) and no training (the
lowest-norm embedding channels are dropped; no LoRA, no HSM operators): speed depends only on the shapes,
which are exactly those of a trained PAT model. Dense and merged runs alternate and each number is the
median of --repeat runs, so load from other processes hits both alike. Prefill: one forward of B x T tokens
(no KV cache); decode: tokens/s of greedy generation with the KV cache.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import load  # noqa: E402
from pat import prune_channels, target_width, top_n  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def merged_without_training(model, ratio, multiple):
    """The narrower model a PAT run would produce, from a hard mask alone (lowest-norm embedding channels dropped)."""
    n = target_width(model.args.dim, ratio, multiple)
    return prune_channels(model, top_n(model.tok_embeddings.weight.float().norm(dim=0), n))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m")
    p.add_argument("--final", default=None, help="a merged PAT checkpoint (default: merge a hard mask, untrained)")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--width-multiple", type=int, default=8)
    p.add_argument("--shapes", default="1x128,4x128,1x512,8x256", help="prefill batch x length list")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    dense, _ = load(a.ckpt, device=device, dtype=dtype)
    if a.final:
        merged, _ = load(a.final, device=device, dtype=dtype)
        source = a.final
    else:
        merged = merged_without_training(dense, a.ratio, a.width_multiple)
        source = f"merge of a hard mask (ratio {a.ratio}) without training"
    count = lambda m: sum(t.numel() for t in {id(t): t for t in m.parameters()}.values())  # noqa: E731
    print(f"dense: dim {dense.args.dim}, {count(dense):,} parameters; merged: dim {merged.args.dim}, "
          f"{count(merged):,} parameters ({source})")
    print(f"device {device} {a.dtype}, {torch.get_num_threads()} threads, median of {a.repeat}\n")
    print("| workload | dense tok/s | merged tok/s | speedup |\n|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for shape in a.shapes.split(","):
        b, t = map(int, shape.split("x"))
        x = torch.randint(dense.args.vocab_size, (b, t), generator=g).to(device)
        times = {"dense": [], "merged": []}
        with torch.inference_mode():
            dense(x), merged(x)  # warm-up
            for _ in range(a.repeat):  # alternate, so background load hits both alike
                times["dense"].append(seconds(lambda: dense(x), device))
                times["merged"].append(seconds(lambda: merged(x), device))
        d, m = (b * t / statistics.median(times[k]) for k in ("dense", "merged"))
        print(f"| prefill {b}x{t} | {d:,.0f} | {m:,.0f} | {m / d:.2f}x |", flush=True)
    prompt = torch.randint(dense.args.vocab_size, (32,), generator=g).tolist()
    times = {"dense": [], "merged": []}
    for model in (dense, merged):
        model.generate(prompt, 4)  # warm-up
    for _ in range(a.repeat):
        for name, model in (("dense", dense), ("merged", merged)):
            times[name].append(seconds(lambda: model.generate(prompt, a.decode_tokens), device))
    d, m = (a.decode_tokens / statistics.median(times[k]) for k in ("dense", "merged"))
    print(f"| decode: 32-token prompt + {a.decode_tokens} greedy tokens, KV cache | {d:,.1f} | {m:,.1f} | {m / d:.2f}x |")


if __name__ == "__main__":
    main()
