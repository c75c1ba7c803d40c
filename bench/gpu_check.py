"""The checks of bench/gpu_check.sh that are more than a command line: each prints its result as Markdown and exits
with status 1 when its check fails. The script runs them; by hand, e.g.

    python bench/gpu_check.py env
    python bench/gpu_check.py stage --out /tmp/gpu_check/model --tokenizer cache/gpu_stage/tokenizer
    python bench/gpu_check.py eval --ckpt out/ast/final --data-dir data
    python bench/gpu_check.py sparse --ckpt out/ast/final
    python bench/gpu_check.py sdpa --ckpt out/ast/final --data-dir data
    python bench/gpu_check.py compare out/fsdp_calm out/fsdp_resumed

env: GPU, torch, CUDA, cuDNN, cuSPARSELt, NCCL. stage: the model the checks run, SmolLM2-135M when its converted copy is
in the cache (never fetched here: a GPU box may be offline), else random weights in its shape (said so: perplexities
are then meaningless, comparisons still hold). eval: WikiText-2 windows on CUDA fp32 and bf16 against CPU fp32
(fp32: perplexity within 1e-4 relative and >= 99% same next-token predictions; bf16 reported). sparse:
kernels24.sparse.to_sparse per backend on a bf16 2:4 model: logits against dense, greedy generation equal. sdpa: which
scaled_dot_product_attention backends run each attention path of model.py, and which one runs by default. compare:
two training runs' exports (masks, weights, last perplexity) and the full shapes of the optimizer state in state.pt.
"""
import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
from eval import WikiText2, packed_hidden  # noqa: E402
from kernels24.sparse import BACKENDS, to_sparse  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from sparsity import check_nm, prunable_linears, prune  # noqa: E402
from tokenizer import TiktokenTokenizer, load_tokenizer  # noqa: E402

SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536, head_dim=64,
               norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True)


def env(a):
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        driver = "?"
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    print(f"| GPU | {props.name}, compute capability {props.major}.{props.minor}, "
          f"{props.total_memory / 2**30:.0f} GiB, driver {driver} |")
    print(f"| torch | {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"cuSPARSELt {cusparselt}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}) |")
    print(f"| Python | {platform.python_version()} on {platform.machine()} |")


def stage(a):
    """The converted SmolLM2 from the cache when it is there, else random weights in its shape."""
    converted = checkpoint.cache_dir() / "smollm2-135m" / "converted"
    if (converted / "model.safetensors").exists():
        model, tok = checkpoint.load(converted)
        what = f"SmolLM2-135M, real weights ({converted})"
    else:
        tok_dir = Path(a.tokenizer) if a.tokenizer else None
        tok = load_tokenizer(tok_dir) if tok_dir and tok_dir.is_dir() else None
        params = json.loads((tok_dir / "params.json").read_text()) if tok and (tok_dir / "params.json").exists() \
            else SMOLLM2
        if tok is None:  # bytes: ids < 258 of SmolLM2's 49152, enough to run every path
            tok = TiktokenTokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256, "</s>": 257}, r"\S+|\s+",
                                    bos_id=256, eos_id=257, add_bos=False, specials_in_text=False, name="bytes")
        torch.manual_seed(0)
        model = Transformer(ModelArgs(**params))
        what = (f"RANDOM weights in SmolLM2-135M's shape, {'SmolLM2' if tok_dir and tok_dir.is_dir() else 'byte'} "
                f"tokenizer (no {converted}): perplexities are meaningless; comparisons and speeds hold")
    checkpoint.save(model, tok, a.out)
    print(f"- model: {what}; saved to `{a.out}`")


@torch.no_grad()
def nlls_and_predictions(model, windows, batch_size=4):
    device = next(model.parameters()).device
    nlls, preds = [], []
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size].to(device)
        logits = model(batch)[:, :-1].float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        nlls.append(nll.view(len(batch), -1).double().mean(1).cpu())
        preds.append(logits.argmax(-1).cpu())
    return torch.cat(nlls), torch.cat(preds)


def eval_cmp(a):
    _, tok = checkpoint.load(a.ckpt, tokenizer=True)
    windows = WikiText2(tok, a.data_dir, a.seq_len, a.windows).windows
    results, ok = {}, True
    for name, device, dtype in (("CPU fp32", "cpu", torch.float32), ("CUDA fp32", "cuda", torch.float32),
                                ("CUDA bf16", "cuda", torch.bfloat16)):
        model, _ = checkpoint.load(a.ckpt, device=device, dtype=dtype, tokenizer=False)
        t0 = time.perf_counter()
        nll, pred = nlls_and_predictions(model, windows)
        results[name] = (math.exp(nll.mean().item()), pred, time.perf_counter() - t0)
        del model
    ref_ppl, ref_pred, _ = results["CPU fp32"]
    print(f"WikiText-2, {len(windows)} windows of {a.seq_len} tokens, `{a.ckpt}`\n")
    print("| run | ppl | rel. diff vs CPU | same predictions | seconds | check |\n|---|---|---|---|---|---|")
    for name, (ppl, pred, seconds) in results.items():
        rel, same = abs(ppl - ref_ppl) / ref_ppl, (pred == ref_pred).float().mean().item()
        check = "-"
        if name == "CUDA fp32":
            passed = rel <= 1e-4 and same >= 0.99
            ok &= passed
            check = "pass (<= 1e-4, >= 99%)" if passed else "FAIL (needs <= 1e-4 and >= 99%)"
        elif name == "CUDA bf16":
            check = "reported"
        print(f"| {name} | {ppl:.4f} | {rel:.2e} | {same:.2%} | {seconds:.1f} | {check} |")
    return ok


def load_24(ckpt):
    """The model in bf16 on CUDA with 2:4 projections: as saved (AST's export), else magnitude-pruned here."""
    model, tok = checkpoint.load(ckpt, device="cuda", dtype=torch.bfloat16)
    if not all(check_nm(lin.weight, 2, 4) for lin in prunable_linears(model).values()):
        prune(model, "magnitude", (2, 4), log=lambda *a, **k: None)
    return model, tok


@torch.no_grad()
def sparse(a):
    model, tok = load_24(a.ckpt)
    prompt = tok.encode("The history of the city begins in the year")[:a.prompt]
    x = torch.randint(100, model.args.vocab_size, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref, ref_gen = model(x), model.generate(prompt, a.new_tokens)
    ok = True
    print(f"`{a.ckpt}` in bf16: logits on 2 x 128 tokens, greedy generation of {a.new_tokens} tokens\n")
    print("| backend | converted linears | logits rel. L2 vs dense | same argmax | greedy equal | check |")
    print("|---|---|---|---|---|---|")
    for backend in BACKENDS:
        model, _ = load_24(a.ckpt)
        try:
            done = to_sparse(model, backend=backend, log=lambda line: None)
            got, gen = model(x), model.generate(prompt, a.new_tokens)
        except Exception as e:  # a backend this torch/GPU can't run: reported, the other may still run
            print(f"| {backend} | - | - | - | - | FAIL: {type(e).__name__}: {str(e).splitlines()[0][:100]} |")
            ok = False
            continue
        rel = ((got - ref).float().norm() / ref.float().norm()).item()
        same = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        first = next((i for i, (p, q) in enumerate(zip(gen, ref_gen)) if p != q), None)
        passed = first is None and len(gen) == len(ref_gen) and rel < 1e-2 and len(done) > 0
        ok &= passed
        print(f"| {backend} | {len(done)} | {rel:.2e} | {same:.2%} | {'yes' if first is None else f'no (token {first})'} "
              f"| {'pass' if passed else 'FAIL'} |")
    return ok


def kernel_family(names) -> str:
    """The SDPA backend a list of CUDA kernel names shows (flash, efficient, cudnn; none of them: math)."""
    joined = " ".join(names).lower()
    for key, family in (("flash", "flash"), ("cudnn", "cudnn"), ("fmha", "efficient"), ("mem_eff", "efficient"),
                        ("efficient", "efficient")):
        if key in joined:
            return family
    return "math"


@torch.no_grad()
def sdpa(a):
    model, _ = checkpoint.load(a.ckpt, device="cuda", dtype=torch.bfloat16, tokenizer=False)
    x = torch.randint(0, model.args.vocab_size, (2, 256), device="cuda")
    T = 96  # a packed row: a shared prefix of 64 tokens, then two segments of 16 that see it and themselves
    seg = torch.tensor([0] * 64 + [1] * 16 + [2] * 16, device="cuda")
    pos = torch.cat([torch.arange(64), torch.arange(64, 80), torch.arange(64, 80)]).cuda()[None]
    mask = (torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
            & ((seg[:, None] == seg[None]) | (seg[None] == 0)))[None, None]

    def decode(chunk):
        model.setup_cache(1, 160)
        model(x[:1, :128], start_pos=0)
        return model(x[:1, 128:128 + chunk], start_pos=128)

    paths = {"prefill / training (causal, GQA, no mask)": lambda: model(x),
             "decode (1 query, KV cache, no mask)": lambda: decode(1),
             "chunk after a prompt (bool mask, k/v repeated)": lambda: decode(16),
             "packed eval rows (bool mask, k/v repeated)": lambda: packed_hidden(model, x[:1, :T], pos, mask)}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    print("| attention path | default runs | " + " | ".join(backends) + " |")
    print("|---|---|" + "---|" * len(backends))
    for name, fn in paths.items():
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            torch.cuda.synchronize()
        attention = [e.name for e in prof.key_averages() if any(k in e.name.lower() for k in
                     ("flash", "fmha", "efficient", "cudnn", "attention", "softmax"))]
        cells = []
        for backend in backends.values():
            try:
                with sdpa_kernel([backend]):
                    fn()
                    torch.cuda.synchronize()
                cells.append("runs")
            except RuntimeError as e:
                cells.append("no: " + str(e).splitlines()[0][:60].replace("|", "/"))
        print(f"| {name} | {kernel_family(attention)} | " + " | ".join(cells) + " |")
    model.setup_cache(None, None)
    return True


def compare(a):
    """Two runs' exports: the same masks, weights close; the second run's state.pt holds full-shape Adam moments."""
    wa, wb = (load_file(str(Path(d) / "final" / "model.safetensors")) for d in (a.a, a.b))
    ma, mb = (checkpoint.load_masks(Path(d) / "final") for d in (a.a, a.b))
    same = sum(int((ma[k] == mb[k]).sum()) for k in ma) / sum(m.numel() for m in ma.values())
    diff = math.sqrt(sum(float((wa[k].float() - wb[k].float()).norm()) ** 2 for k in wa))
    norm = math.sqrt(sum(float(wa[k].float().norm()) ** 2 for k in wa))
    state = torch.load(Path(a.b) / "state.pt", map_location="cpu", weights_only=True)
    moments = state["optimizer"]["state"]  # FSDP's gathered state is keyed by parameter name
    full = all(isinstance(n, str) and s["exp_avg"].shape == state["model"][n].shape for n, s in moments.items())
    last = [json.loads(line).get("ppl") for line in open(Path(a.a) / "log.jsonl")][-1], \
        [json.loads(line).get("ppl") for line in open(Path(a.b) / "log.jsonl")][-1]
    ok = same >= 0.999 and diff / norm < 1e-3 and full
    print(f"- `{a.b}` against `{a.a}`: masks {same:.4%} the same, weights rel. L2 difference {diff / norm:.2e}, "
          f"last ppl {last[0]} vs {last[1]}; optimizer state in state.pt full-shape: {full} "
          f"-> {'pass' if ok else 'FAIL'} (needs >= 99.9% masks, < 1e-3, full shapes)")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    s = sub.add_parser("stage")
    s.add_argument("--out", required=True, help="where the checkpoint the checks use is written")
    s.add_argument("--tokenizer", default=None, help="a folder with SmolLM2's tokenizer files and params.json")
    for s in (sub.add_parser("eval"), sub.add_parser("sparse"), sub.add_parser("sdpa")):
        s.add_argument("--ckpt", required=True)
        s.add_argument("--data-dir", default="data")
        s.add_argument("--windows", type=int, default=8, help="WikiText-2 windows (eval)")
        s.add_argument("--seq-len", type=int, default=512, help="WikiText-2 window length (eval)")
        s.add_argument("--prompt", type=int, default=8, help="prompt tokens (sparse)")
        s.add_argument("--new-tokens", type=int, default=32, help="greedy tokens (sparse)")
    s = sub.add_parser("compare")
    s.add_argument("a")
    s.add_argument("b")
    a = p.parse_args()
    fn = {"env": env, "stage": stage, "eval": eval_cmp, "sparse": sparse, "sdpa": sdpa, "compare": compare}[a.command]
    sys.exit(0 if fn(a) in (None, True) else 1)


if __name__ == "__main__":
    main()
