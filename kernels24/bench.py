"""
Where do 2:4 sparse tensor cores pay? Dense vs CUTLASS vs cuSPARSELt, measured in one run on one GPU.

    python -m kernels24.bench                      # everything below (needs a CUDA GPU, compute capability >= 8.0)
    python -m kernels24.bench --models ""          # per-linear table only
    python -m kernels24.bench --out out/kernels        # also writes out/kernels24/kernels_bench.json

1. Per linear layer, at SmolLM2-135M and Llama-2-7B shapes (q/k/v/o, gate/up, down) and token counts
   1 ... 16384: y = F.linear(x, W) with W dense (already 2:4-masked) vs W = to_sparse_semi_structured(W)
   under each backend. Each run is timed alone with CUDA events after flushing L2 (a 256 MB write), so the
   weight comes from HBM as in a real model; we report the median of --runs runs and dense/sparse ratios
   (> 1: sparse is faster). Outputs are checked first against the dense masked matmul (relative error < 1e-2).
2. Whole model, dense vs sparse (kernels24.sparse.to_sparse): a magnitude-2:4 SmolLM2-135M (or --ckpt) and a
   random-weight Llama-2-7B-shaped model (2:4 by magnitude; 13.5 GB in bf16). Prefill: one forward pass
   without KV cache over n tokens (batch n // 4096 of 4096 tokens when n > 4096). Decode: per-step latency of
   one token per sequence with the KV cache after a 128-token prompt, eager mode (no CUDA graphs / compile).
   Each converted model's logits are checked against dense first (logits_check).
A wrong result or a failing backend is listed at the end and the exit status is 1, after the tables and --out.
"""
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import sparsity
from cli import DTYPES, UserError, atomic_write, cli_main, flag, parse_config
from kernels24.sparse import BACKENDS, check_gpu, to_sparse
from model import ModelArgs, Transformer

LINEAR_SHAPES = {  # (out, in) of the 2:4 linears
    "smollm2-135m": {"q,o": (576, 576), "k,v": (192, 576), "gate,up": (1536, 576), "down": (576, 1536)},
    "llama2-7b": {"q,k,v,o": (4096, 4096), "gate,up": (11008, 4096), "down": (4096, 11008)},
}
MODELS = ("smollm2-135m", "llama2-7b-random")  # the whole-model part's choices
OUT_FILE = "kernels_bench.json"
MAX_LOGITS_REL_ERR = 5e-2  # two bf16 roundings of a random 2:4 SmolLM2-shaped model differ by 1.3e-2 (CPU, measured)
MIN_ARGMAX_AGREEMENT = 0.9  # ... and agree on 98.8% of argmaxes; a wrong kernel's logits are noise


@dataclass
class BenchConfig:
    """Dense vs 2:4 sparse tensor cores (CUTLASS, cuSPARSELt): per-linear and whole-model timings on one GPU."""
    dtype: Literal["bfloat16", "float16"] = "bfloat16"  # weight and activation dtype (2:4 kernels: 16-bit only)
    backends: str = "cutlass,cusparselt"  # comma-separated sparse backends to time against dense
    tokens: str = "1,16,128,1024,4096,16384"  # per-linear token counts
    runs: int = 100  # timed runs per linear measurement (median)
    model_runs: int = 10  # timed runs per whole-model measurement (median)
    models: str = "smollm2-135m,llama2-7b-random"  # whole models to time (smollm2-135m, llama2-7b-random); "": none
    smollm2: str = "smollm2-135m"  # name or path for checkpoint.load (on an offline GPU box: a local copy)
    ckpt: str = ""  # a 2:4 checkpoint to use instead of magnitude-pruning SmolLM2
    prefill: str = "128,1024,4096,16384"  # whole-model prefill token counts
    decode_batch: str = "1,16"  # whole-model decode batch sizes
    decode_steps: int = 32  # timed decode steps per batch size (median)
    out: str = ""  # a directory to also write all results to, as kernels_bench.json ("": print only)
    seed: int = 0  # random seed of the weights and inputs


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def check_flags(cfg: BenchConfig) -> None:
    """The comma-separated flags, before any GPU work: positive integers and known model names."""
    unknown = [m for m in cfg.models.split(",") if m and m not in MODELS]
    if unknown:
        raise UserError(f"--models: unknown model {unknown[0]!r}; use {' and/or '.join(MODELS)} (or \"\")")
    for name in ("tokens", "prefill", "decode_batch"):
        value = getattr(cfg, name)
        try:
            ok = all(n > 0 for n in ints(value))
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"{flag(name)} {value}: must be comma-separated positive integers")


def output_dir(out: str) -> Path | None:
    """--out as a directory (created now), or None without --out; checked before any GPU work."""
    if not out:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: is a file; --out is a directory (the results go to {out}/{OUT_FILE})")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    return path


# ----------------------------------------------------------------------------- timing

class Timer:
    """Median milliseconds of fn over `runs` runs, each timed alone with CUDA events after an L2 flush."""

    def __init__(self, flush_mb: int = 256):
        self.flush = torch.empty(flush_mb << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn, runs: int, warmup: int = 5, flush: bool = True) -> float:
        for _ in range(warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for start, end in events:
            if flush:
                self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def logits_check(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, bool]:
    """(relative L2 error, share of equal argmaxes, passed) of teacher-forced logits against the dense model's.
    Not greedy generation: with random weights one ulp can turn its path, so it is at most reported."""
    rel = rel_err(got, ref)
    same = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, same, rel < MAX_LOGITS_REL_ERR and same >= MIN_ARGMAX_AGREEMENT


def failures(broken: dict, models: list[dict], backends) -> list[str]:
    """Every wrong result or error: per-linear (broken: backend -> first error) and whole-model rows."""
    found = [f"per-linear {b}: {error}" for b, error in broken.items()]
    for row in models:
        for b in backends:
            if isinstance(row.get(b), str):
                found.append(f"{row['model']} with {b}: {row[b]}")
            elif row.get(b + "_logits_ok") is False:
                found.append(f"{row['model']} with {b}: wrong logits (rel err {row[b + '_logits_rel_err']:.2e}, "
                             f"argmax agreement {row[b + '_argmax_agreement']:.2%})")
    return found


def sparse_weight(w: torch.Tensor, backend: str):
    return BACKENDS[backend].from_dense(w)


# ----------------------------------------------------------------------------- 1. per linear

@torch.inference_mode()
def bench_linears(cfg: BenchConfig, timer: Timer, dtype, backends) -> tuple[list[dict], dict]:
    """(rows, {backend: its first error or wrong result})."""
    rows = []
    broken = {}  # backend -> first error, so one failure doesn't flood the table
    for model_name, shapes in LINEAR_SHAPES.items():
        for layer, (out, n_in) in shapes.items():
            w = torch.randn(out, n_in, device="cuda", dtype=dtype) * 0.02
            w = w * sparsity.nm_mask(w.abs().float(), 2, 4)  # the 2 largest |w| of every 4 inputs
            sparse = {}
            for b in backends:
                if b in broken:
                    continue
                try:
                    sparse[b] = sparse_weight(w, b)
                    x = torch.randn(16, n_in, device="cuda", dtype=dtype)
                    err = rel_err(F.linear(x, sparse[b]), F.linear(x, w))
                    if err >= 1e-2:
                        raise RuntimeError(f"wrong result: relative error {err:.2e} vs the dense masked matmul")
                except Exception as e:  # a backend that fails here is reported, not benchmarked
                    broken[b] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    sparse.pop(b, None)
                    print(f"backend {b} unusable at {model_name} {layer} ({out}x{n_in}): {broken[b]}", flush=True)
            for n in ints(cfg.tokens):
                x = torch.randn(n, n_in, device="cuda", dtype=dtype)
                row = {"model": model_name, "layer": layer, "out": out, "in": n_in, "tokens": n,
                       "dense_ms": timer(lambda: F.linear(x, w), cfg.runs)}
                for b, ws in sparse.items():
                    row[b + "_ms"] = timer(lambda: F.linear(x, ws), cfg.runs)
                    row[b + "_speedup"] = row["dense_ms"] / row[b + "_ms"]
                rows.append(row)
                print(table_row(row, backends), flush=True)
            del sparse, w
            torch.cuda.empty_cache()
    return rows, broken


def table_head(backends) -> str:
    cols = ["model", "layer", "out x in", "tokens", "dense ms"] + [f"{b} ms" for b in backends] + \
        [f"dense/{b}" for b in backends]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def table_row(r: dict, backends) -> str:
    ms = [f"{r[b + '_ms']:.4f}" if b + "_ms" in r else "n/a" for b in backends]
    ratio = [f"{r[b + '_speedup']:.2f}x" if b + "_speedup" in r else "n/a" for b in backends]
    return "| " + " | ".join([r["model"], r["layer"], f"{r['out']}x{r['in']}", str(r["tokens"]),
                              f"{r['dense_ms']:.4f}"] + ms + ratio) + " |"


# ----------------------------------------------------------------------------- 2. whole model

def build_model(name: str, cfg: BenchConfig, dtype):
    if name == "llama2-7b-random":
        torch.manual_seed(cfg.seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build directly in bf16 on the GPU: 13.5 GB, no fp32 copy
        try:
            with torch.device("cuda"):
                model = Transformer(ModelArgs())  # the defaults are Llama-2-7B's shapes
        finally:
            torch.set_default_dtype(default)
        sparsity.prune(model, "magnitude", (2, 4))  # the 7 projections of every block, in place
        return model.eval()
    if name == "smollm2-135m":
        if cfg.ckpt:
            model, _ = checkpoint.load(cfg.ckpt, device="cuda", dtype=dtype, tokenizer=False)
        else:
            model, _ = checkpoint.load(cfg.smollm2, device="cuda", dtype=dtype, tokenizer=False)
            sparsity.prune(model, "magnitude", (2, 4))
        return model.eval()
    raise UserError(f"--models: unknown model {name!r}; use {' and/or '.join(MODELS)}")


@torch.inference_mode()
def time_model(model, cfg: BenchConfig, timer: Timer) -> dict:
    vocab = model.args.vocab_size
    res = {}
    for n in ints(cfg.prefill):
        B = max(1, n // 4096)
        tokens = torch.randint(vocab, (B, n // B), device="cuda")
        res[f"prefill_{n}_ms"] = timer(lambda: model(tokens), cfg.model_runs, warmup=2, flush=False)
    prompt = 128
    for B in ints(cfg.decode_batch):
        model.setup_cache(B, prompt + cfg.decode_steps + 8)
        model(torch.randint(vocab, (B, prompt), device="cuda"), start_pos=0)
        nxt = torch.randint(vocab, (B, 1), device="cuda")
        for i in range(4):  # warm-up steps
            model(nxt, start_pos=prompt + i)
        events = []
        for i in range(4, 4 + cfg.decode_steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(nxt, start_pos=prompt + i)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        res[f"decode_b{B}_ms"] = statistics.median(s.elapsed_time(e) for s, e in events)
        model.setup_cache(None, None)
    return res


def bench_models(cfg: BenchConfig, timer: Timer, dtype, backends) -> list[dict]:
    results = []
    for name in [m for m in cfg.models.split(",") if m]:
        t0 = time.perf_counter()
        model = build_model(name, cfg, dtype)
        print(f"\n{name}: built in {time.perf_counter() - t0:.0f}s, "
              f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB on the GPU", flush=True)
        dense = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        with torch.inference_mode():
            probe = torch.randint(model.args.vocab_size, (2, 128), device="cuda")
            ref = model(probe)
        row = {"model": name, "dense": time_model(model, cfg, timer)}
        for b in backends:
            try:
                converted = to_sparse(model, backend=b)
                with torch.inference_mode():
                    checked = logits_check(model(probe), ref)
                row[b + "_logits_rel_err"], row[b + "_argmax_agreement"], row[b + "_logits_ok"] = checked
                row[b] = time_model(model, cfg, timer)
                row[b + "_converted"] = len(converted)
            except Exception as e:
                row[b] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                print(f"{name} with {b}: {row[b]}", flush=True)
            for n, m in model.named_modules():  # back to the dense weights for the next backend
                if n in dense:
                    m.weight = dense[n]
        results.append(row)
        print(model_table(row, backends), flush=True)
        del model, dense, ref
        torch.cuda.empty_cache()
    return results


def model_table(row: dict, backends) -> str:
    lines = [f"| {row['model']} | dense ms | " + " | ".join(f"{b} ms | dense/{b}" for b in backends) + " |",
             "|---|---|" + "---|---|" * len(backends)]
    for key, dense_ms in row["dense"].items():
        cells = [key.removesuffix("_ms").replace("_", " "), f"{dense_ms:.3f}"]
        for b in backends:
            if isinstance(row.get(b), dict):
                cells += [f"{row[b][key]:.3f}", f"{dense_ms / row[b][key]:.2f}x"]
            else:
                cells += ["n/a", "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    errs = ", ".join(f"{b} logits rel err {row[b + '_logits_rel_err']:.2e}, argmax agreement "
                     f"{row[b + '_argmax_agreement']:.2%} ({'ok' if row[b + '_logits_ok'] else 'WRONG'}; "
                     f"{row.get(b + '_converted')} linears sparse)" for b in backends if b + "_logits_rel_err" in row)
    return "\n".join(lines) + (f"\n{errs}" if errs else "")


# ----------------------------------------------------------------------------- main

def environment() -> dict:
    cc = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "capability": f"{cc[0]}.{cc[1]}", "torch": torch.__version__,
            "cuda": torch.version.cuda, "cusparselt_available": torch.backends.cusparselt.is_available(),
            "cusparselt_version": torch.backends.cusparselt.version()}


def main(argv=None):
    cfg = parse_config(BenchConfig, argv)
    check_flags(cfg)
    out = output_dir(cfg.out)
    if not torch.cuda.is_available():
        raise UserError(f"kernels24.bench needs a CUDA GPU with compute capability >= 8.0 and torch "
                        f"{torch.__version__} sees none; run it on a GPU machine")
    dtype = DTYPES[cfg.dtype]
    check_gpu(torch.device("cuda"), "cutlass")  # compute capability >= 8.0, else one line and exit
    backends = []
    for b in [b for b in cfg.backends.split(",") if b]:
        try:
            check_gpu(torch.device("cuda"), b)
            backends.append(b)
        except UserError as e:
            print(f"skipping backend {b}: {e}")
    if not backends:
        raise UserError(f"--backends {cfg.backends}: none is usable on this GPU")
    env = environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    print(f"dtype={cfg.dtype} runs={cfg.runs} (median, L2 flushed before each run)\n", flush=True)
    torch.manual_seed(cfg.seed)
    timer = Timer()
    print(table_head(backends), flush=True)
    linears, broken = bench_linears(cfg, timer, dtype, backends)
    models = bench_models(cfg, timer, dtype, backends)
    wrong = failures(broken, models, backends)
    if out is not None:
        results = {"env": env, "config": asdict(cfg), "linears": linears, "models": models, "failures": wrong}
        atomic_write(out / OUT_FILE, lambda p: Path(p).write_text(json.dumps(results, indent=1)))
        print(f"wrote {out / OUT_FILE}")
    if wrong:
        raise UserError(f"{len(wrong)} wrong result(s) or failing backend(s): " + "; ".join(wrong))


if __name__ == "__main__":
    cli_main(main)
