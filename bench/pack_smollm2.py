"""
The README's storage table: a real 2:4 SmolLM2-135M (magnitude 2:4 on the 7 projections of every block)
packed by kernels24.pack in each storage form (pattern-coded positions, and once the older 2-bit positions);
bytes per weight counted from the files (header, positions, scales and mins included), compression vs fp32,
pack time, and the packed model's logits vs the 2:4 model's.

    python bench/pack_smollm2.py [--ckpt smollm2-135m] [--out out/pack_smollm2]

The 2:4 checkpoint and the packed ones are written under --out (gitignored), ~1.5 GB in all.
Last, the pack/unpack arithmetic alone is timed on one thread in CPU seconds.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoint  # noqa: E402
import packed  # noqa: E402
import sparsity  # noqa: E402
from checkpoint import load  # noqa: E402
from cli import cli_main, parse_config  # noqa: E402
from kernels24 import pack  # noqa: E402

FORMS = [  # (label, pack CLI flags); positions are pattern-coded (the default) unless --positions 2bit
    ("2:4, fp32 values", []),
    ("2:4, bf16 values (all tensors bf16)", ["--dtype", "bfloat16"]),
    ("2:4, 4-bit g128 values (fp32 rest), 2-bit positions (format 1)", ["--bits", "4", "--positions", "2bit"]),
    ("2:4, 4-bit g128 values (fp32 rest)", ["--bits", "4"]),
    ("2:4, 4-bit g128 values (bf16 rest)", ["--bits", "4", "--dtype", "bfloat16"]),
]


@dataclass
class Config:
    """The README's storage table: a magnitude-2:4 SmolLM2-135M packed in each storage form."""
    ckpt: str = "smollm2-135m"  # the dense model to prune to 2:4 (a name or a path)
    out: str = "out/pack_smollm2"  # directory for the 2:4 checkpoint and the packed ones (~1.5 GB)


def main(argv=None):
    cfg = parse_config(Config, argv)
    out = Path(cfg.out)
    model, tok = load(cfg.ckpt, dtype=torch.float32)
    t0 = time.perf_counter()
    masks = sparsity.prune(model, "magnitude", (2, 4))  # the 7 projections of every block, in place
    print(f"magnitude 2:4 on {len(masks)} linears in {time.perf_counter() - t0:.1f}s")
    checkpoint.save(model, tok, out / "ckpt_2to4", masks=masks)
    dense_file = (out / "ckpt_2to4" / "model.safetensors").stat().st_size
    n_all = sum(t.numel() for t in model.state_dict().values()) - (model.args.vocab_size * model.args.dim
                                                                    if model.args.tie_embeddings else 0)
    print(f"our 2:4 checkpoint: model.safetensors {dense_file:,} bytes = {dense_file / n_all:.4f} bytes/weight "
          f"({n_all:,} weights; + masks.safetensors {(out / 'ckpt_2to4' / 'masks.safetensors').stat().st_size:,})")
    x = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is Rome, and the "
                                 "capital of Germany is")])
    with torch.no_grad():
        ref = model(x)
    rows = []
    for label, flags in FORMS:
        dst = out / ("packed_" + "_".join(f.strip("-") for f in flags) if flags else out / "packed")
        r = pack.main(["--ckpt", str(out / "ckpt_2to4"), "--out", str(dst)] + flags)
        m2, _ = load(dst, dtype=torch.float32)
        with torch.no_grad():
            got = m2(x)
        if "--dtype" in flags:  # the reference is the 2:4 model cast the same way, run in fp32
            m_cast, _ = load(out / "ckpt_2to4", dtype=torch.bfloat16)
            m_cast.float()
            with torch.no_grad():
                ref_form = m_cast(x)
        else:
            ref_form = ref
        err = float((got - ref_form).norm() / ref_form.norm())
        rows.append((label, r, err, torch.equal(got, ref_form)))
    print("\n| form | 2:4 linears: bytes/weight | vs fp32 | whole file: bytes | bytes/weight | vs fp32 "
          "| pack s (CPU s) | logits vs 2:4 model |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| dense fp32 (our format, 2:4 zeros stored) | 4.0000 | 1.00x | {dense_file:,} | "
          f"{dense_file / n_all:.4f} | {4 * n_all / dense_file:.2f}x | - | - |")
    for label, r, err, exact in rows:
        print(f"| {label} | {r['packed_bytes_per_weight']:.4f} | {r['linear_compression_vs_fp32']:.2f}x | "
              f"{r['file_bytes']:,} | {r['file_bytes_per_weight']:.4f} | {r['model_compression_vs_fp32']:.2f}x | "
              f"{r['seconds']:.1f} ({r['cpu_seconds']:.1f}) | {'identical' if exact else f'rel. L2 err {err:.3f}'} |")
    print(f"\n{rows[0][1]['n_packed_weights']:,} weights in 2:4 linears of {n_all:,} "
          f"(linears' bytes/weight include the whole safetensors header: {rows[0][1]['header_bytes']:,} bytes)")

    # the packing arithmetic alone, one thread, CPU time (the CLI's wall time above includes disk and a busy machine)
    torch.set_num_threads(1)
    state = checkpoint.read_safetensors(out / "ckpt_2to4" / "model.safetensors")
    names = [k + ".weight" for k in masks]
    for bits in (0, 4):
        for code in packed.POSITIONS:
            c0 = time.process_time()
            tensors, layout = packed.pack_state_dict(state, names, masks, bits, 128, positions=code)
            c1 = time.process_time()
            back = packed.unpack_state_dict(tensors, layout)
            c2 = time.process_time()
            same = all(torch.equal(back[k], state[k]) for k in state)
            print(f"--bits {bits} --positions {code}: pack_state_dict {c1 - c0:.1f}s CPU, unpack_state_dict "
                  f"{c2 - c1:.1f}s CPU (1 thread, {len(names)} weights); unpacked == 2:4 weights: {same}")


if __name__ == "__main__":
    cli_main(main)
