"""llama.cpp on our GGUF exports of SmolLM2-135M: does it compute what we compute, and is PAT's narrower model
faster there? (llama-cpp-python, a bench-only dependency: pip install -r bench/requirements.txt; it compiles
llama.cpp, minutes.)

    python bench/bench_llama_cpp.py                                  # agreement + speed, 432 / 448 / 512 wide PAT models
    python bench/bench_llama_cpp.py --widths 432 --repeat 3 --ppl-windows 2    # quicker
    python bench/bench_llama_cpp.py --no-agreement --widths 448,432,416        # tokenizers and speed only
    python bench/bench_llama_cpp.py --no-agreement --no-speed                   # tokenizers only (a minute)

Models, all made here from the dense checkpoint in seconds (the shapes are what the speed depends on):
- dense: --ckpt as it is;
- 2:4: one-shot magnitude 2:4 on the seven projections (sparsity.prune; the zeros are stored as zeros);
- PAT: pat.prune_channels keeping the channels of largest embedding norm, merged into a narrower Llama: exactly
  the shapes a trained PAT model of that width has (as bench/bench_pat_speed.py does).
0. Tokenizers: llama.cpp's tokenizer on a GGUF we wrote (vocabulary only) gives our ids on the first 100,000
   characters of WikiText-2 test, for --ckpt's tokenizer and for Llama 2's and Llama 3's (../shared/data/tokenizers).
1. Agreement: a random Llama with Llama 3.1's RoPE scaling, logits over 3,000 positions, llama.cpp vs ours; and
   llama.cpp's perplexity on our WikiText-2 windows (the same token ids, every position's logits) vs
   ours (float32 torch), for dense, 2:4 and the first --widths PAT model, stored f32 and f16 (q8_0 for reference).
2. Speed: prompt processing (--prompt-len tokens in one batch) and generation (--decode-steps single-token
   decodes after it; no sampling) tokens/s from llama.cpp's own counters (llama_perf_context), dense vs each PAT
   width at f16 and q8_0. All models are loaded side by side and run in turn, the order rotating each repeat, so
   load from other processes hits them alike; each number is the median of --repeat runs, and the ratios to dense
   are the result (absolute tokens/s depend on the machine and its load).
--extra-bufts off (the default) turns off llama.cpp's extra weight buffers (AMX and weight repacking): its AMX
q8_0 kernels crash (SIGSEGV) in sandboxes that hide AMX state; turn them on where AMX works.
"""
import contextlib
import copy
import json
import math
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import load  # noqa: E402
from cli import cli_main, parse_config  # noqa: E402
from data import resolve_data_dir, wikitext2_text  # noqa: E402
from eval import WikiText2, window_nlls  # noqa: E402
from gguf_file import write_gguf  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from pat import prune_channels, top_n  # noqa: E402
from sparsity import prune  # noqa: E402
from tokenizer import SentencePieceTokenizer, llama3_tokenizer, vocab_of  # noqa: E402


@dataclass
class LlamaCppBench:
    """llama.cpp vs ours on GGUF exports: perplexity agreement, and PAT's speed against dense."""
    ckpt: str = "smollm2-135m"  # the dense model (checkpoint.load)
    widths: str = "432,448,512"  # PAT widths to time (the first is also checked for agreement)
    ppl_windows: int = 4  # WikiText-2 test windows for the agreement
    ppl_seq_len: int = 512  # tokens per window
    prompt_len: int = 128  # prompt tokens processed in one batch per timed run
    decode_steps: int = 32  # single-token decodes per timed run
    repeat: int = 5  # timed runs per model (median)
    threads: int = 1  # llama.cpp threads for the timing (the perplexity uses 2)
    extra_bufts: bool = False  # llama.cpp's extra weight buffers (AMX, repacking)
    agreement: bool = True  # the perplexity comparison (slow: nine llama.cpp perplexity runs)
    speed: bool = True  # the speed comparison
    data_dir: str | None = None  # default ./data, then ../shared/data
    out: str = ""  # directory for the GGUFs and results.json ("": a temporary directory)


@contextlib.contextmanager
def extra_buffers(enabled: bool):
    """llama-cpp-python has no flag for llama_model_params.use_extra_bufts: patch the default Llama() starts from."""
    from llama_cpp import llama_cpp  # the ctypes module, as llama_cpp.Llama calls it
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = enabled
        return p
    llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_model_default_params = default


def open_gguf(path, threads, extra_bufts, n_ctx, logits_all=False):
    import llama_cpp
    with extra_buffers(extra_bufts):
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all, verbose=False)


def models(a, dense):
    """name -> our model: dense, 2:4 (one-shot magnitude), PAT at each width (one-shot channel prune, merged)."""
    sparse = copy.deepcopy(dense)
    prune(sparse, "magnitude", (2, 4), log=lambda *args: None)
    norms = dense.tok_embeddings.weight.float().norm(dim=0)
    out = {"dense": dense, "2:4": sparse}
    for w in map(int, a.widths.split(",")):
        out[f"PAT {w}"] = prune_channels(dense, top_n(norms, w))
    return out


def llama_cpp_ppl(llm, windows) -> float:
    """exp(mean over windows of the mean next-token NLL), from llama.cpp's logits at every position."""
    nlls = []
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        top = logits.max(axis=1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        nlls.append(float((lse - logits[np.arange(len(w) - 1), w[1:]]).mean()))
    return math.exp(statistics.fmean(nlls))


def tokenizer_agreement(tok, data_dir, out_dir) -> list:
    """Our ids and llama.cpp's on WikiText-2 text, through a vocabulary-only GGUF of each tokenizer."""
    import llama_cpp
    tokenizers = {"checkpoint": tok}
    if (data_dir / "tokenizers" / "llama2" / "tokenizer.model").exists():
        tokenizers["Llama 2"] = SentencePieceTokenizer((data_dir / "tokenizers" / "llama2" / "tokenizer.model").read_bytes())
    if (data_dir / "tokenizers" / "llama3" / "tokenizer.model").exists():
        tokenizers["Llama 3"] = llama3_tokenizer(data_dir / "tokenizers" / "llama3" / "tokenizer.model")
    text = wikitext2_text(data_dir)[:100_000]
    rows = []
    for name, t in tokenizers.items():
        vocab = vocab_of(t)
        path = out_dir / f"vocab-{name.replace(' ', '')}.gguf"
        tiny = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=len(vocab.tokens), hidden_dim=32))
        write_gguf(tiny, vocab, path, "f32")
        with contextlib.closing(llama_cpp.Llama(str(path), vocab_only=True, verbose=False)) as llm:
            theirs = llm.tokenize(text.encode(), add_bos=t.add_bos, special=False)
        ours = t.encode(text)
        rows.append(dict(tokenizer=name, model=vocab.model, ours=len(ours), llama_cpp=len(theirs), equal=ours == theirs))
        print(f"tokenizer {name} ({vocab.model}): {len(ours)} ids, llama.cpp's equal: {ours == theirs}", flush=True)
    return rows


def rope_scaling_agreement(vocab, out_dir, length=3000) -> dict:
    """A random Llama with Llama 3.1's RoPE scaling (its rope_freqs table) through llama.cpp: the largest logit
    difference to ours before and after position 2048 (where the scaling changes the model), relative to ours."""
    import llama_cpp
    torch.manual_seed(0)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    model = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=len(vocab.tokens),
                                  hidden_dim=256, rope_theta=500000.0, rope_scaling=scaling, max_seq_len=8192)).eval()
    write_gguf(model, vocab, out_dir / "rope-llama31.gguf", "f32")
    ids = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    with contextlib.closing(open_gguf(out_dir / "rope-llama31.gguf", 2, False, 4096, logits_all=True)) as llm:
        llm.eval(ids)
        err = np.abs(np.asarray(llm.scores[:length]) - ref).max(axis=1) / np.abs(ref).max()
    row = dict(before_2048=float(err[:2048].max()), after_2048=float(err[2048:].max()))
    print(f"Llama 3.1 RoPE scaling: llama.cpp vs ours, max relative logit difference {row['before_2048']:.1e} "
          f"before position 2048, {row['after_2048']:.1e} after", flush=True)
    return row


def agreement(a, ours, vocab, windows, out_dir) -> list:
    rows = []
    first_pat = f"PAT {a.widths.split(',')[0]}"
    for name in ("dense", "2:4", first_pat):
        model = ours[name]
        ref = math.exp(window_nlls(model, windows).mean().item())
        for gguf_type in ("f32", "f16", "q8_0"):
            path = out_dir / f"{name.replace(' ', '').replace(':', 'of')}-{gguf_type}.gguf"
            write_gguf(model, vocab, path, gguf_type)
            with contextlib.closing(open_gguf(path, 2, a.extra_bufts, a.ppl_seq_len, logits_all=True)) as llm:
                ppl = llama_cpp_ppl(llm, windows)
            rows.append(dict(model=name, width=model.args.dim, type=gguf_type, ours=ref, llama_cpp=ppl,
                             rel=ppl / ref - 1))
            print(f"{name:>8} {gguf_type:>5}: ours {ref:.4f}  llama.cpp {ppl:.4f}  ({ppl / ref - 1:+.3%})", flush=True)
    return rows


def timed_run(llm, prompt, decode) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) of one run, from llama.cpp's counters."""
    import llama_cpp
    ctx = llm._ctx.ctx
    llm.reset()
    llama_cpp.llama_perf_context_reset(ctx)
    llm.eval(prompt)
    llama_cpp.llama_synchronize(ctx)  # the counters are updated when the computation is synchronised
    for t in decode:
        llm.eval([t])
        llama_cpp.llama_synchronize(ctx)
    d = llama_cpp.llama_perf_context(ctx)
    assert d.n_p_eval == len(prompt) and d.n_eval == len(decode), (d.n_p_eval, d.n_eval)
    return 1e3 * d.n_p_eval / d.t_p_eval_ms, 1e3 * d.n_eval / d.t_eval_ms


def speed(a, ours, vocab, ids, out_dir) -> list:
    names = ["dense"] + [n for n in ours if n.startswith("PAT")]
    prompt, decode = ids[: a.prompt_len], ids[a.prompt_len: a.prompt_len + a.decode_steps]
    runs = {}
    for name in names:
        for gguf_type in ("f16", "q8_0"):
            path = out_dir / f"{name.replace(' ', '')}-{gguf_type}.gguf"
            if not path.exists():
                write_gguf(ours[name], vocab, path, gguf_type)
            runs[(name, gguf_type)] = dict(llm=open_gguf(path, a.threads, a.extra_bufts, 512), pp=[], tg=[])
    keys = list(runs)
    for r in range(a.repeat):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotate the order each repeat
            pp, tg = timed_run(runs[key]["llm"], prompt, decode)
            runs[key]["pp"].append(pp)
            runs[key]["tg"].append(tg)
        print(f"repeat {r + 1}/{a.repeat} done", flush=True)
    rows = []
    for (name, gguf_type), run in runs.items():
        base = runs[("dense", gguf_type)]
        pp, tg = statistics.median(run["pp"]), statistics.median(run["tg"])
        rows.append(dict(model=name, width=ours[name].args.dim, type=gguf_type, pp=pp, tg=tg,
                         pp_ratio=pp / statistics.median(base["pp"]), tg_ratio=tg / statistics.median(base["tg"])))
    return rows


def print_tables(a, tokens, agree, timing):
    import llama_cpp
    print(f"\nllama-cpp-python {llama_cpp.__version__}, {llama_cpp.llama_print_system_info().decode().strip()}")
    print(f"extra buffers (AMX, repacking) {'on' if a.extra_bufts else 'off'}; timing threads {a.threads}\n")
    print("Tokenizers: WikiText-2 test, first 100,000 characters\n")
    print("| tokenizer | GGUF model | ids (ours) | ids (llama.cpp) | equal |")
    print("|---|---|---:|---:|---|")
    for r in tokens:
        print(f"| {r['tokenizer']} | {r['model']} | {r['ours']} | {r['llama_cpp']} | {'yes' if r['equal'] else 'NO'} |")
    if agree:
        print(f"\nAgreement: WikiText-2 test, first {a.ppl_windows} windows of {a.ppl_seq_len} tokens\n")
        print("| model | width | GGUF type | ppl ours (fp32) | ppl llama.cpp | difference |")
        print("|---|---:|---|---:|---:|---:|")
        for r in agree:
            print(f"| {r['model']} | {r['width']} | {r['type']} | {r['ours']:.3f} | {r['llama_cpp']:.3f} | "
                  f"{r['rel']:+.3%} |")
    if timing:
        print(f"\nSpeed: {a.prompt_len}-token prompt, {a.decode_steps} decode steps, median of {a.repeat}\n")
        print("| model | width | GGUF type | prompt tok/s | vs dense | generation tok/s | vs dense |")
        print("|---|---:|---|---:|---:|---:|---:|")
    for r in sorted(timing, key=lambda r: (r["type"], -r["width"])):
        print(f"| {r['model']} | {r['width']} | {r['type']} | {r['pp']:.1f} | {r['pp_ratio']:.2f}x | "
              f"{r['tg']:.1f} | {r['tg_ratio']:.2f}x |")


def main(argv=None) -> dict:
    a = parse_config(LlamaCppBench, argv)
    dense, tok = load(a.ckpt)
    torch.set_num_threads(2)
    data_dir = resolve_data_dir(a.data_dir)
    wikitext = WikiText2(tok, data_dir, a.ppl_seq_len, a.ppl_windows)
    ours, vocab = models(a, dense), vocab_of(tok)
    with contextlib.ExitStack() as stack:
        out_dir = Path(a.out) if a.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out_dir.mkdir(parents=True, exist_ok=True)
        tokens = tokenizer_agreement(tok, data_dir, out_dir)
        rope = rope_scaling_agreement(vocab, out_dir) if a.agreement else {}
        agree = agreement(a, ours, vocab, wikitext.windows, out_dir) if a.agreement else []
        timing = speed(a, ours, vocab, wikitext.windows.flatten().tolist(), out_dir) if a.speed else []
        result = dict(config=asdict(a), tokenizers=tokens, rope_scaling=rope, agreement=agree, speed=timing)
        if a.out:
            (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    print_tables(a, tokens, agree, timing)
    return result


if __name__ == "__main__":
    cli_main(main)
