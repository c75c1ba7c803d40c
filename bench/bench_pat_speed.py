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
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import load  # noqa: E402
from cli import DTYPES, Device, DType, UserError, cli_main, parse_config, resolve_device  # noqa: E402
from pat import prune_channels, target_width, top_n  # noqa: E402

PROMPT_TOKENS = 32  # the decode workload's prompt


@dataclass
class SpeedArgs:
    """Prefill and decode speed of a PAT-merged (narrower) Llama against the dense one, measured in one run."""
    ckpt: str = "smollm2-135m"  # the dense model: name or checkpoint path (checkpoint.load)
    final: str | None = None  # a merged PAT checkpoint (None: merge a hard mask of --ratio, untrained)
    ratio: float = 0.25  # without --final: the fraction of the hidden dimension pruned
    width_multiple: int = 8  # without --final: the merged width is a multiple of this
    shapes: str = "1x128,4x128,1x512,8x256"  # prefill workloads: comma list of batch x length
    decode_steps: int = 32  # greedy tokens generated after a 32-token prompt, with the KV cache
    repeat: int = 5  # timed runs of each workload (the median is reported)
    threads: int = 0  # torch CPU threads (0: torch's default)
    device: Device = "cpu"  # auto: cuda when torch sees a GPU, else cpu
    dtype: DType = "float32"  # weight dtype of both models


def parse_shapes(spec: str) -> "list[tuple[int, int]]":
    """--shapes "1x128,4x128" -> [(1, 128), (4, 128)]; anything else is one line naming the item."""
    shapes = []
    for item in spec.split(","):
        try:
            b, t = (int(v) for v in item.strip().split("x"))
        except ValueError:
            raise UserError(f"--shapes item {item!r}: write batch x length, e.g. 1x128,4x128") from None
        if b < 1 or t < 1:
            raise UserError(f"--shapes {item.strip()}: batch and length must be positive, e.g. 1x128")
        shapes.append((b, t))
    return shapes


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


def main(argv=None):
    a = parse_config(SpeedArgs, argv)
    shapes = parse_shapes(a.shapes)
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = resolve_device(a.device), DTYPES[a.dtype]
    dense, _ = load(a.ckpt, device=device, dtype=dtype)
    if a.final:
        merged, _ = load(a.final, device=device, dtype=dtype)
        source = a.final
    else:
        if a.width_multiple > dense.args.dim:
            raise UserError(f"--width-multiple {a.width_multiple}: larger than the model's width {dense.args.dim}")
        merged = merged_without_training(dense, a.ratio, a.width_multiple)
        source = f"merge of a hard mask (ratio {a.ratio}) without training"
    too_long = [t for _, t in shapes if t > dense.args.max_seq_len]
    if too_long:
        raise UserError(f"--shapes: length {too_long[0]} is longer than the model's context "
                        f"({dense.args.max_seq_len} tokens)")
    count = lambda m: sum(t.numel() for t in {id(t): t for t in m.parameters()}.values())  # noqa: E731
    print(f"dense: dim {dense.args.dim}, {count(dense):,} parameters; merged: dim {merged.args.dim}, "
          f"{count(merged):,} parameters ({source})")
    print(f"device {device} {a.dtype}, {torch.get_num_threads()} threads, median of {a.repeat}\n")
    print("| workload | dense tok/s | merged tok/s | speedup |\n|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for b, t in shapes:
        x = torch.randint(dense.args.vocab_size, (b, t), generator=g).to(device)
        times = {"dense": [], "merged": []}
        with torch.inference_mode():
            dense(x), merged(x)  # warm-up
            for _ in range(a.repeat):  # alternate, so background load hits both alike
                times["dense"].append(seconds(lambda: dense(x), device))
                times["merged"].append(seconds(lambda: merged(x), device))
        d, m = (b * t / statistics.median(times[k]) for k in ("dense", "merged"))
        print(f"| prefill {b}x{t} | {d:,.0f} | {m:,.0f} | {m / d:.2f}x |", flush=True)
    prompt = torch.randint(dense.args.vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
    times = {"dense": [], "merged": []}
    for model in (dense, merged):
        model.generate(prompt, 4)  # warm-up
    for _ in range(a.repeat):
        for name, model in (("dense", dense), ("merged", merged)):
            times[name].append(seconds(lambda: model.generate(prompt, a.decode_steps), device))
    d, m = (a.decode_steps / statistics.median(times[k]) for k in ("dense", "merged"))
    print(f"| decode: {PROMPT_TOKENS}-token prompt + {a.decode_steps} greedy tokens, KV cache | {d:,.1f} | {m:,.1f} | "
          f"{m / d:.2f}x |")


if __name__ == "__main__":
    cli_main(main)
