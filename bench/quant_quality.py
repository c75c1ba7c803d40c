"""
2:4 + 4-bit with quality measured: WikiText-2 perplexity and bytes of a 2:4 checkpoint as it is (fp32), packed
with round-to-nearest 4-bit g128 and with GPTQ 4-bit g128 (kernels24.pack --bits 4 --quantizer rtn|gptq; GPTQ
keeps the 2:4 zeros and is calibrated block by block on C4, obs.gptq).

    python bench/quant_quality.py --ckpt DIR [--out out/quant_quality] [--nsamples 128 --calib-len 2048]
        [--ppl-seq-len 2048 --ppl-windows 8] [--group-size 128] [--dense smollm2-135m] [--quantizers rtn,gptq]
        [--act-order] [--true-sequential] [--percdamp 0.01]   # GPTQ's options (kernels24.pack)
        [--ppl-split valid]   # WikiText-2's validation file, to choose those options on

The packed checkpoints and results.json go under --out (gitignored). Bytes per weight are counted from the
files: the 2:4 linears' (header, positions, scales and mins included) and the whole file's.
"""
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoint  # noqa: E402
from checkpoint import load  # noqa: E402
from cli import Device, UserError, check_output_dir, cli_main, parse_config, resolve_device  # noqa: E402
from data import resolve_data_dir  # noqa: E402
from eval import WikiText2  # noqa: E402
from kernels24 import pack  # noqa: E402


@dataclass
class Config:
    """Perplexity and bytes of a 2:4 checkpoint: fp32, round-to-nearest 4-bit and GPTQ 4-bit."""
    ckpt: str = ""  # (required) a 2:4 checkpoint directory in our format (sparsity.py --out, train_ast's export)
    out: str = "out/quant_quality"  # directory for the packed checkpoints and results.json
    overwrite: bool = False  # replace what an earlier run left in --out
    group_size: int = 128  # kept values per 4-bit group
    nsamples: int = 128  # GPTQ calibration windows (C4)
    calib_len: int = 2048  # tokens per calibration window
    seed: int = 0  # calibration sampling seed
    ppl_seq_len: int = 2048  # WikiText-2 perplexity window length
    ppl_windows: int = 8  # evaluate only the first N perplexity windows (0: all)
    ppl_split: Literal["test", "valid"] = "test"  # WikiText-2 file (valid: to choose GPTQ's settings on)
    dense: str | None = None  # also evaluate this dense model (a name or path) for reference
    data_dir: str | None = None  # default ./data, then ../shared/data
    device: Device = "auto"  # evaluation and GPTQ device
    quantizers: str = "rtn,gptq"  # which packed forms to measure (comma list of rtn, gptq)
    act_order: bool = False  # GPTQ's --act-order (kernels24.pack)
    true_sequential: bool = False  # GPTQ's --true-sequential (kernels24.pack)
    percdamp: float = 0.01  # GPTQ's damping, fraction of mean(diag H) (kernels24.pack)


def main(argv=None):
    cfg = parse_config(Config, argv)
    if not cfg.ckpt:
        raise UserError("--ckpt is required: a 2:4 checkpoint directory in our format")
    ckpt, out = checkpoint.resolve(cfg.ckpt), check_output_dir(cfg.out, cfg.overwrite)
    if not (ckpt / "model.safetensors").is_file():
        raise UserError(f"--ckpt {cfg.ckpt}: no model.safetensors at {ckpt}; prune first (python sparsity.py "
                        f"--sparsity 2:4 --out DIR)")
    device, data_dir = resolve_device(cfg.device), resolve_data_dir(cfg.data_dir)
    model, tok = load(ckpt, device=device)
    ppl = WikiText2(tok, data_dir, cfg.ppl_seq_len, cfg.ppl_windows, split=cfg.ppl_split)
    print(f"protocol: {ppl.describe()}", flush=True)
    rows = []
    if cfg.dense:
        dense, _ = load(cfg.dense, device=device, tokenizer=False)
        rows.append({"form": f"dense {cfg.dense} (fp32)", "ppl": ppl(dense)})
        del dense
    n_all = sum(t.numel() for t in checkpoint.read_safetensors(ckpt / "model.safetensors").values())
    file_bytes = (ckpt / "model.safetensors").stat().st_size
    rows.append({"form": "2:4 fp32 (our checkpoint, zeros stored)", "ppl": ppl(model), "linear_bpw": 4.0,
                 "file_bytes": file_bytes, "file_bpw": file_bytes / n_all})
    del model
    base = rows[-1]["ppl"]
    print(f"2:4 fp32 ppl {base:.3f}", flush=True)
    quantizers = [x for x in cfg.quantizers.split(",") if x]
    if not quantizers or set(quantizers) - {"rtn", "gptq"}:
        raise UserError(f"--quantizers {cfg.quantizers}: a comma list of rtn, gptq")
    gptq_options = [flag for flag, on in (("--act-order", cfg.act_order), ("--true-sequential", cfg.true_sequential))
                    if on]
    for quantizer in quantizers:
        flags = ["--ckpt", str(ckpt), "--out", str(out / quantizer), "--bits", "4", "--group-size",
                 str(cfg.group_size), "--quantizer", quantizer, "--overwrite", "--device", cfg.device]
        if quantizer == "gptq":
            flags += ["--nsamples", str(cfg.nsamples), "--calib-len", str(cfg.calib_len), "--seed", str(cfg.seed)]
            flags += ["--data-dir", str(data_dir), "--percdamp", str(cfg.percdamp)] + gptq_options
        r = pack.main(flags)
        m, _ = load(out / quantizer, device=device, tokenizer=False)
        t = time.perf_counter()
        how = "".join(f", {flag[2:]}" for flag in gptq_options) if quantizer == "gptq" else ""
        if quantizer == "gptq" and cfg.percdamp != pack.PackConfig.percdamp:
            how += f", percdamp {cfg.percdamp:g}"
        rows.append({"form": f"2:4 + {quantizer.upper()} 4-bit g{cfg.group_size}{how} (packed, rest fp32)", "ppl": ppl(m),
                     "linear_bpw": r["packed_bytes_per_weight"], "file_bytes": r["file_bytes"],
                     "file_bpw": r["file_bytes_per_weight"], "pack_s": r["seconds"], "report": r})
        print(f"{quantizer} ppl {rows[-1]['ppl']:.3f} (eval {time.perf_counter() - t:.0f}s)", flush=True)
        del m
    print(f"\n{ppl.describe()}; GPTQ calibration {cfg.nsamples} x {cfg.calib_len} tokens of C4, seed {cfg.seed}\n")
    print("| model | WikiText-2 ppl | vs 2:4 fp32 | 2:4 linears: bytes/weight | vs fp32 | whole file: bytes "
          "| bytes/weight | vs fp32 | pack s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = (f"{r['linear_bpw']:.4f} | {4 / r['linear_bpw']:.2f}x | {r['file_bytes']:,} | {r['file_bpw']:.4f} | "
                f"{4 / r['file_bpw']:.2f}x" if "file_bytes" in r else "- | - | - | - | -")
        seconds = f"{r['pack_s']:.0f}" if "pack_s" in r else "-"
        print(f"| {r['form']} | {r['ppl']:.3f} | {r['ppl'] / base - 1:+.1%} | {size} | {seconds} |")
    if "gptq" in quantizers:
        gptq = next(r for r in rows if "GPTQ" in r["form"])["ppl"] / base - 1
        print(f"\nGPTQ is {gptq:+.2%} from the 2:4 fp32 model (target: within 5%): {'met' if gptq <= 0.05 else 'NOT met'}")
    results = {"config": asdict(cfg), "protocol": ppl.describe(), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli_main(main)
