"""The checks of bench/gpu_check.sh that are more than a command line. Each prints Markdown, ends with one line
`result: pass ...` or `result: FAIL ...`, and exits with status 1 when its check fails. The script runs them; by hand:

    python bench/gpu_check.py env
    python bench/gpu_check.py stage --out /tmp/gpu_check/model --tokenizer cache/gpu_stage/tokenizer [--shape tiny]
    python bench/gpu_check.py sparse --ckpt /tmp/gpu_check/model
    python bench/gpu_check.py eval --ckpt /tmp/gpu_check/model --data-dir cache/gpu_stage/data
    python bench/gpu_check.py sdpa --ckpt /tmp/gpu_check/model [--allow math]
    python bench/gpu_check.py memory --shape llama3.2-1b --batch-size 2 --seq-len 2048 --grad-accum 2
    torchrun --nproc_per_node 1 bench/gpu_check.py stop-after 4 SIGTERM train_ast.py --fsdp ...  # stop test
    python bench/gpu_check.py compare out/fsdp_calm out/fsdp_resumed

env: GPU, driver, torch, CUDA, cuDNN, cuSPARSELt, NCCL, PYTHONPATH. stage: the model the checks run, SmolLM2-135M when
its converted copy is in the cache (never fetched here: the GPU box is offline), else random weights in its shape
(said so). sparse: kernels24.sparse.to_sparse per backend on a bf16 2:4 model, teacher-forced logits against dense
(kernels24.bench.logits_check: relative error and argmax agreement; greedy agreement reported only, one ulp can turn
a random model's greedy path). eval: WikiText-2 on CUDA fp32 / bf16 against CPU fp32. sdpa: which SDPA backend ran
each attention path, read from the aten op the dispatcher chose (a KV cache is set up outside the profiled region);
prefill falling back to math fails. memory: train_ast's step under FSDP (1 process, bf16 gathers, activation
checkpointing, chunked loss) on a random Llama-3.2-1B-shaped model, torch.cuda.max_memory_allocated beside the
README's per-GPU formula item by item. stop-after: run a trainer with SIGTERM sent to itself after its N-th step (what a
scheduler's preemption sends). compare: two runs' exports and the optimizer state.
"""
import argparse
import copy
import functools
import json
import math
import os
import platform
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint as activation_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import training  # noqa: E402
import train_ast  # noqa: E402
from data import TokenBatches  # noqa: E402
from eval import WikiText2, packed_hidden  # noqa: E402
from kernels24.bench import logits_check  # noqa: E402
from kernels24.sparse import BACKENDS, to_sparse  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from sparsity import check_nm, prunable_linears, prune  # noqa: E402
from tokenizer import TiktokenTokenizer, load_tokenizer  # noqa: E402

SHAPES = {
    "smollm2": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536, head_dim=64,
                    norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "llama2-7b": {},  # ModelArgs' defaults (the README's 7B table: --formula-only --world-size 8 --batch-size 2 ...)
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=192, norm_eps=1e-5,
                 rope_theta=10000.0, max_seq_len=1024, tie_embeddings=True),  # the CPU rehearsal's
}


def result(passed: bool, what: str) -> bool:
    print(f"\nresult: {'pass' if passed else 'FAIL'}: {what}")
    return passed


def env(a):
    rows = {}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            driver = "?"
        cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
        rows["GPU"] = (f"{props.name}, compute capability {props.major}.{props.minor}, "
                       f"{props.total_memory / 2**30:.0f} GiB, driver {driver}")
        rows["CUDA"] = (f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, cuSPARSELt {cusparselt}, "
                        f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
    else:
        rows["GPU"] = "none: torch sees no CUDA device"
    rows["torch"] = torch.__version__
    rows["Python"] = f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs"
    rows["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    try:
        import gguf  # noqa: F401  (only GGUF files need it; nothing on the GPU path does)
        rows["gguf"] = "installed"
    except ImportError:
        rows["gguf"] = "not installed (only GGUF files need it)"
    print("| | |\n|---|---|")
    for key, value in rows.items():
        print(f"| {key} | {value} |")
    want_cuda = a.device == "cuda"
    return result(torch.cuda.is_available() or not want_cuda,
                  "a CUDA device" if want_cuda else f"CPU rehearsal, torch {torch.__version__}")


def byte_tokenizer():
    """Bytes as ids < 258: enough to run every path when no tokenizer was staged."""
    return TiktokenTokenizer({bytes([i]): i for i in range(256)}, {"<s>": 256, "</s>": 257}, r"\S+|\s+",
                             bos_id=256, eos_id=257, add_bos=False, specials_in_text=False, name="bytes")


def stage(a):
    """The converted SmolLM2 from the cache when it is there (and --shape smollm2), else random weights."""
    converted = checkpoint.cache_dir() / "smollm2-135m" / "converted"
    tok_dir = Path(a.tokenizer) if a.tokenizer else None
    if a.shape == "smollm2" and (converted / "model.safetensors").exists():
        model, tok = checkpoint.load(converted)
        what = f"SmolLM2-135M, real weights ({converted})"
    else:
        tok = load_tokenizer(tok_dir) if tok_dir and tok_dir.is_dir() else byte_tokenizer()
        torch.manual_seed(0)
        model = Transformer(ModelArgs(**SHAPES[a.shape]))
        what = (f"RANDOM weights in the {a.shape} shape, {tok.name if hasattr(tok, 'name') else 'staged'} tokenizer "
                f"(no real weights here): perplexities are meaningless; comparisons and speeds hold")
    checkpoint.save(model, tok, a.out)
    print(f"- model: {what}; {sum(p.numel() for p in model.parameters()):,} parameters; saved to `{a.out}`")
    return result(True, "model staged")


def load_24(ckpt, device, dtype=torch.bfloat16):
    """The model with 2:4 projections: as saved (AST's export), else magnitude-pruned here."""
    model, tok = checkpoint.load(ckpt, device=device, dtype=dtype)
    if not all(check_nm(lin.weight, 2, 4) for lin in prunable_linears(model).values()):
        prune(model, "magnitude", (2, 4), log=lambda *a, **k: None)
    return model, tok


@torch.no_grad()
def sparse(a):
    model, tok = load_24(a.ckpt, "cuda")
    prompt = tok.encode("The history of the city begins in the year")[:a.prompt]
    x = torch.randint(100, model.args.vocab_size, (2, 128), device="cuda",
                      generator=torch.Generator("cuda").manual_seed(0))
    ref, ref_gen = model(x), model.generate(prompt, a.new_tokens)
    ok = True
    print(f"`{a.ckpt}` in bf16, teacher-forced logits on 2 x 128 tokens; greedy generation of {a.new_tokens} tokens "
          f"reported only\n")
    print("| backend | converted linears | logits rel. L2 vs dense | same argmax | greedy equal | check |")
    print("|---|---|---|---|---|---|")
    for backend in BACKENDS:
        model, _ = load_24(a.ckpt, "cuda")
        try:
            done = to_sparse(model, backend=backend, log=lambda line: None)
            got, gen = model(x), model.generate(prompt, a.new_tokens)
        except Exception as e:  # a backend this torch/GPU can't run: reported, the other may still run
            print(f"| {backend} | - | - | - | - | FAIL: {type(e).__name__}: {str(e).splitlines()[0][:100]} |")
            ok = False
            continue
        rel, same, passed = logits_check(got, ref)
        passed &= len(done) > 0
        first = next((i for i, (p, q) in enumerate(zip(gen, ref_gen)) if p != q), None)
        ok &= passed
        print(f"| {backend} | {len(done)} | {rel:.2e} | {same:.2%} | {'yes' if first is None else f'no (token {first})'}"
              f" | {'pass' if passed else 'FAIL'} |")
    return result(ok, "every backend's logits agree with dense" if ok else "a backend's logits are wrong")


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
    results = {}
    for name, device, dtype in (("CPU fp32", "cpu", torch.float32), (f"{a.device} fp32", a.device, torch.float32),
                                (f"{a.device} bf16", a.device, torch.bfloat16)):
        model, _ = checkpoint.load(a.ckpt, device=device, dtype=dtype, tokenizer=False)
        t0 = time.perf_counter()
        nll, pred = nlls_and_predictions(model, windows)
        results[name] = (math.exp(nll.mean().item()), pred, time.perf_counter() - t0)
        del model
    ref_ppl, ref_pred, _ = results["CPU fp32"]
    print(f"WikiText-2, {len(windows)} windows of {a.seq_len} tokens, `{a.ckpt}`\n")
    print("| run | ppl | rel. diff vs CPU | same predictions | seconds | check |\n|---|---|---|---|---|---|")
    ok = True
    for i, (name, (ppl, pred, seconds)) in enumerate(results.items()):
        rel, same = abs(ppl - ref_ppl) / ref_ppl, (pred == ref_pred).float().mean().item()
        check = "reference" if i == 0 else "reported"
        if i == 1:  # fp32 on the device
            ok = rel <= 1e-4 and same >= 0.99
            check = "pass (<= 1e-4, >= 99%)" if ok else "FAIL (needs <= 1e-4 and >= 99%)"
        print(f"| {name} | {ppl:.4f} | {rel:.2e} | {same:.2%} | {seconds:.1f} | {check} |")
    return result(ok, f"{a.device} fp32 agrees with CPU fp32" if ok else f"{a.device} fp32 differs from CPU fp32")


# ----------------------------------------------------------------------------- SDPA backends

SDPA_OPS = {"aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_efficient_attention": "efficient",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
            "aten::_scaled_dot_product_attention_math": "math"}


def sdpa_backends(op_counts: dict) -> tuple[int, str]:
    """(calls of scaled_dot_product_attention, the backends that ran them) from profiled aten op counts: the op the
    dispatcher chose names the backend; a call with none of the fused ops ran math."""
    calls = op_counts.get("aten::scaled_dot_product_attention", 0)
    fused = {SDPA_OPS[name]: n for name, n in op_counts.items() if name in SDPA_OPS and SDPA_OPS[name] != "math"}
    ran = dict(fused, **({"math": calls - sum(fused.values())} if calls > sum(fused.values()) else {}))
    return calls, ", ".join(f"{name} x{n}" for name, n in sorted(ran.items())) or "none"


@torch.no_grad()
def sdpa(a):
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model, _ = checkpoint.load(a.ckpt, device=a.device, dtype=dtype, tokenizer=False)
    dev, n_layers = torch.device(a.device), model.args.n_layers
    x = torch.randint(0, model.args.vocab_size, (2, 256), device=dev)
    T = 96  # a packed row: a shared prefix of 64 tokens, then two segments of 16 that see it and themselves
    seg = torch.tensor([0] * 64 + [1] * 16 + [2] * 16, device=dev)
    pos = torch.cat([torch.arange(64), torch.arange(64, 80), torch.arange(64, 80)]).to(dev)[None]
    mask = (torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            & ((seg[:, None] == seg[None]) | (seg[None] == 0)))[None, None]

    def prompt_in_cache():  # outside the measured region: the cache and the prompt's prefill
        model.setup_cache(1, 160)
        model(x[:1, :128], start_pos=0)

    paths = {"prefill / training (causal, GQA, no mask)": (None, lambda: model(x)),  # (setup, measured)
             "decode (1 query, KV cache, no mask)": (prompt_in_cache, lambda: model(x[:1, 128:129], start_pos=128)),
             "chunk after a prompt (bool mask, k/v repeated)": (prompt_in_cache,
                                                                lambda: model(x[:1, 128:144], start_pos=128)),
             "packed eval rows (bool mask, k/v repeated)": (None, lambda: packed_hidden(model, x[:1, :T], pos, mask))}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    allowed = [backends[b] for b in a.allow.split(",")]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"`{a.ckpt}` in {str(dtype).removeprefix('torch.')} on {a.device}; the default run may use: {a.allow}\n")
    print("| attention path | SDPA calls | default ran | " + " | ".join(f"only {b}" for b in backends) + " |")
    print("|---|---|---|" + "---|" * len(backends))
    ok = True
    for name, (setup, fn) in paths.items():
        if setup:
            setup()
        sync()
        with sdpa_kernel(allowed), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
            sync()
        calls, ran = sdpa_backends({e.key: e.count for e in prof.key_averages()})
        wrong_calls = calls != n_layers  # one forward measured, nothing else (a prefill inside would double it)
        math_prefill = name.startswith("prefill") and "math" in ran
        ok &= not wrong_calls and not math_prefill
        cells = []
        for backend in backends.values():
            try:
                with sdpa_kernel([backend]):
                    fn()
                    sync()
                cells.append("runs")
            except RuntimeError as e:
                cells.append("no: " + str(e).splitlines()[0][:60].replace("|", "/"))
        note = " (FAIL: prefill fell back to math)" if math_prefill else ""
        note += f" (FAIL: {calls} calls measured, the model has {n_layers} layers)" if wrong_calls else ""
        print(f"| {name} | {calls} | {ran}{note} | " + " | ".join(cells) + " |")
    model.setup_cache(None, None)
    return result(ok, "prefill runs a fused kernel, one forward per measured path" if ok else
                  "see the rows marked FAIL")


# ----------------------------------------------------------------------------- memory: formula vs measurement

def memory_formula(args: ModelArgs, world_size: int, batch_size: int, seq_len: int, grad_accum: int,
                   chunk: int = 512) -> dict:
    """The README's per-GPU memory of AST under FSDP (bf16 compute and gathers, fp32 reduction, a teacher, activation
    checkpointing, chunked loss), in bytes per item; the last item is not in the README's table."""
    kv_dim = args.n_kv_heads * args.head_dim
    attn = 2 * args.dim * args.n_heads * args.head_dim + 2 * args.dim * kv_dim
    per_block = attn + 3 * args.dim * args.hidden_dim  # the seven projections (norm gains are negligible)
    sparse = per_block * args.n_layers
    root = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    n = sparse + root
    tokens = batch_size * seq_len
    return {
        "fp32 weights, gradients and Adam's two moments, sharded: 16 B x N / W": 16 * n / world_size,
        "unsharded fp32 gradients accumulated over micro-batches 1..k-1: 4 B x N (only with --grad-accum > 1)":
            4 * n if grad_accum > 1 else 0,
        "bf16 teacher, sharded: 2 B x N / W": 2 * n / world_size,
        "bool masks of the sparse weights + the initial masks packed 8 per byte: 1.125 B x N_sparse": 1.125 * sparse,
        "checkpointed block inputs in bf16: tokens x dim x 2 B x layers": tokens * args.dim * 2 * args.n_layers,
        "one block recomputed in the backward: tokens x (8 dim + 4 hidden) x 2 B":
            tokens * (8 * args.dim + 4 * args.hidden_dim) * 2,
        "gathered bf16 blocks: student's current and prefetched, the teacher's: 3 x block x 2 B": 3 * per_block * 2,
        "loss in chunks: 4 x chunk x vocab fp32 buffers + the head's fp32 gradient": (4 * chunk * args.vocab_size * 4
                                                                                      + args.vocab_size * args.dim * 4),
        "a mask update: the largest layer's mask and packed bits": 1.125 * args.dim * args.hidden_dim,
        "(not in the README) gathered bf16 embeddings/head, student and teacher: 2 x root x 2 B": 2 * root * 2,
    }


def one_process_group(device):
    """A process group of one (FSDP needs one) without torchrun: nccl on CUDA, gloo on CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return training.setup_distributed(device)[3]


def print_formula(formula: dict, title: str):
    print(f"| item ({title}) | GiB |\n|---|---|")
    for item, b in formula.items():
        print(f"| {item} | {b / 2**30:.2f} |")
    print(f"| **formula total** | **{sum(formula.values()) / 2**30:.2f}** |")


def memory(a):
    """train_ast's training step, set up as train_ast.main sets it up for --fsdp --activation-checkpointing."""
    if a.formula_only:
        print_formula(memory_formula(ModelArgs(**SHAPES[a.shape]), a.world_size, a.batch_size, a.seq_len,
                                     a.grad_accum), f"README formula, {a.shape}, world size {a.world_size}")
        return result(True, "formula only")
    device = one_process_group(a.device)
    dtype = training.autocast_dtype("auto", device)
    margs = ModelArgs(**SHAPES[a.shape])
    ast_args = train_ast.ASTArgs(fsdp=True, activation_checkpointing=True, batch_size=a.batch_size,
                                 seq_len=a.seq_len, grad_accum=a.grad_accum, max_steps=a.steps, warmup_steps=1,
                                 mask_interval=2, lr=1e-5, device=a.device)
    gb = lambda b: b / 2**30  # noqa: E731
    allocated = (lambda: torch.cuda.memory_allocated(device)) if device.type == "cuda" else (lambda: 0)
    measured = {}
    torch.manual_seed(0)
    with torch.device(device):
        student = Transformer(margs)
    teacher = copy.deepcopy(student).to(torch.bfloat16 if device.type == "cuda" else dtype).requires_grad_(False)
    teacher.eval()
    masks = train_ast.initial_masks(ast_args, student)
    init_masks = {name: training.pack_bits(m).to(device) for name, m in masks.items()}
    layers = train_ast.sparsify(student, masks)
    for block in student.layers:
        block.forward = functools.partial(activation_checkpoint, block.forward, use_reentrant=False)
    net = training.wrap(student, device, 1, fsdp=True, dtype=dtype)
    training.fsdp_shard(teacher, device, 1)
    optimizer = train_ast.make_optimizer(student, layers, ast_args)
    measured["after setup (weights, teacher, masks)"] = allocated()
    ids = np.random.default_rng(0).integers(0, margs.vocab_size, 4 * a.steps * a.grad_accum * a.batch_size
                                            * (a.seq_len + 1)).astype(np.uint32)
    batches = TokenBatches(ids, a.seq_len, a.batch_size, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for step in range(a.steps):
        parts = train_ast.train_step(net, teacher, optimizer, batches, step, ast_args, device, dtype)
        if step == 0:
            measured["after step 1 (+ Adam's moments)"] = allocated()
        if (step + 1) % ast_args.mask_interval == 0:
            train_ast.update_masks(layers, init_masks)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    seconds = time.perf_counter() - t0
    formula = memory_formula(margs, 1, a.batch_size, a.seq_len, a.grad_accum)
    n = sum(p.numel() for p in student.parameters())
    print(f"{a.shape}: {n / 1e9:.3f}B parameters, 1 process, FSDP, {str(dtype).removeprefix('torch.')}, "
          f"activation checkpointing, chunked loss; {a.steps} steps of {a.grad_accum} x {a.batch_size} x "
          f"{a.seq_len} tokens in {seconds:.1f} s, last loss {parts['loss']:.3f}\n")
    print_formula(formula, "README formula, world size 1")
    for item, b in measured.items():
        print(f"| measured: torch.cuda.memory_allocated {item} | {gb(b):.2f} |" if device.type == "cuda" else
              f"| measured {item} | n/a on CPU |")
    if peak is None:
        print("| **measured: torch.cuda.max_memory_allocated during the steps** | n/a on CPU |")
        training.teardown()
        return result(math.isfinite(parts["loss"]), "formula and steps ran (no CUDA: nothing measured)")
    total = sum(formula.values())
    print(f"| **measured: torch.cuda.max_memory_allocated during the steps** | **{gb(peak):.2f}** "
          f"({peak / total:.2f}x the formula) |")
    training.teardown()
    return result(math.isfinite(parts["loss"]), f"peak {gb(peak):.2f} GiB measured, {gb(total):.2f} GiB by the formula")


# ----------------------------------------------------------------------------- FSDP stop and resume

def stop_after(a):
    """Run a trainer (a .py and its flags) as __main__, with SIGTERM sent to this process after its N-th step."""
    real, calls = training.StopRequest.requested, []

    def requested(self, device):
        calls.append(1)
        if len(calls) == a.steps:
            os.kill(os.getpid(), getattr(signal, a.signal))
        return real(self, device)
    training.StopRequest.requested = requested
    sys.argv = [a.script, *a.flags]
    runpy.run_path(a.script, run_name="__main__")  # cli_main inside ends the process with the trainer's status


def compare(a):
    """Two runs' exports: the same masks, weights close."""
    wa, wb = (load_file(str(Path(d) / "final" / "model.safetensors")) for d in (a.a, a.b))
    ma, mb = (checkpoint.load_masks(Path(d) / "final") for d in (a.a, a.b))
    same = sum(int((ma[k] == mb[k]).sum()) for k in ma) / sum(m.numel() for m in ma.values())
    diff = math.sqrt(sum(float((wa[k].float() - wb[k].float()).norm()) ** 2 for k in wa))
    norm = math.sqrt(sum(float(wa[k].float().norm()) ** 2 for k in wa))
    last = [[json.loads(line).get("ppl") for line in open(Path(d) / "log.jsonl")][-1] for d in (a.a, a.b)]
    ok = same >= 0.999 and diff / norm < 1e-3
    print(f"- `{a.b}` against `{a.a}`: masks {same:.4%} the same, weights rel. L2 difference {diff / norm:.2e}, "
          f"last ppl {last[0]} vs {last[1]} (needs >= 99.9% masks, < 1e-3)")
    print("- one process cannot test: shards split across ranks (uneven rows, masks gathered as packed bits from "
          "several ranks), optimizer state gathered from several ranks into full shapes, a stop agreed across ranks, "
          "NCCL between GPUs (the CPU tests run 2 gloo processes for these)")
    return result(ok, "the resumed run equals the uninterrupted one" if ok else "the resumed run differs")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("env")
    s.add_argument("--device", default="cuda", help="cuda: fail without a GPU; cpu: the rehearsal")
    s = sub.add_parser("stage")
    s.add_argument("--out", required=True, help="where the checkpoint the checks use is written")
    s.add_argument("--tokenizer", default=None, help="a folder with the staged tokenizer files")
    s.add_argument("--shape", default="smollm2", choices=["smollm2", "tiny"])
    for s in (sub.add_parser("eval"), sub.add_parser("sparse"), sub.add_parser("sdpa")):
        s.add_argument("--ckpt", required=True)
        s.add_argument("--device", default="cuda")
        s.add_argument("--data-dir", default="data")
        s.add_argument("--windows", type=int, default=8, help="WikiText-2 windows (eval)")
        s.add_argument("--seq-len", type=int, default=512, help="WikiText-2 window length (eval)")
        s.add_argument("--prompt", type=int, default=8, help="prompt tokens (sparse)")
        s.add_argument("--new-tokens", type=int, default=32, help="greedy tokens (sparse)")
        s.add_argument("--allow", default="flash,efficient,cudnn,math", help="backends the default run may use (sdpa)")
    s = sub.add_parser("memory")
    s.add_argument("--shape", default="llama3.2-1b", choices=list(SHAPES))
    s.add_argument("--device", default="cuda")
    s.add_argument("--batch-size", type=int, default=2)
    s.add_argument("--seq-len", type=int, default=2048)
    s.add_argument("--grad-accum", type=int, default=2)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--world-size", type=int, default=1, help="GPUs (--formula-only; the run is one process)")
    s.add_argument("--formula-only", action="store_true", help="print the formula for the shape, run nothing")
    s = sub.add_parser("stop-after")
    s.add_argument("steps", type=int, help="the signal comes after this many steps")
    s.add_argument("signal", help="its name, e.g. SIGTERM (positional: torchrun reads --options before the script's)")
    s.add_argument("script")
    s.add_argument("flags", nargs=argparse.REMAINDER)
    s = sub.add_parser("compare")
    s.add_argument("a")
    s.add_argument("b")
    a = p.parse_args()
    fn = {"env": env, "stage": stage, "eval": eval_cmp, "sparse": sparse, "sdpa": sdpa, "memory": memory,
          "stop-after": stop_after, "compare": compare}[a.command]
    sys.exit(0 if fn(a) in (None, True) else 1)


if __name__ == "__main__":
    main()
