"""Our Llama vs transformers on SmolLM2-135M, on this machine, measured in one run.

    python bench/bench_model.py                  # load time + forward tokens/s, ratios
    python bench/bench_model.py --ppl-windows 0  # also WikiText-2 perplexity from both on the same windows (0 = all)

transformers is only the reference here (pip install transformers accelerate); the project never imports it.
"""
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import export_hf, fetch_smollm2, load  # noqa: E402
from cli import cli_main, parse_config  # noqa: E402
from data import resolve_data_dir  # noqa: E402
from eval import WikiText2  # noqa: E402


@dataclass
class BenchArgs:
    """Our Llama vs transformers on SmolLM2-135M: load time, forward tokens/s and (optionally) perplexity."""
    repeat: int = 3  # timings per measurement (the best is kept)
    ppl_windows: int | None = None  # also WikiText-2 perplexity on the first N windows (0: all; omitted: skip)
    ppl_seq_len: int = 2048  # WikiText-2 perplexity window length
    data_dir: str | None = None  # default ./data, then ../shared/data


def timed(fn, repeat=1):
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def forward_tokens_per_s(fn, tokens, repeat):
    with torch.inference_mode():
        fn(tokens)  # warm-up
        seconds, _ = timed(lambda: fn(tokens), repeat)
    return tokens.numel() / seconds


class Logits(torch.nn.Module):
    """transformers' model as eval.WikiText2 expects one: tokens -> logits."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, tokens):
        return self.hf(tokens).logits


def main(argv=None):
    a = parse_config(BenchArgs, argv)
    import transformers

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    gguf = fetch_smollm2()
    load("smollm2-135m")  # make sure the converted cache exists before timing
    t_ours, (model, tok) = timed(lambda: load("smollm2-135m"), a.repeat)
    t_ours_gguf, _ = timed(lambda: load(gguf))
    t_hf_gguf, hf = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval())
    with tempfile.TemporaryDirectory() as d:
        export_hf(model, tok, d)
        t_hf_st, _ = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), a.repeat)
    print("\nload time (s)                           ours    transformers   ratio (theirs/ours)")
    print(f"  smollm2-135m (ours: cached safetensors; theirs: GGUF)  {t_ours:6.2f}  {t_hf_gguf:8.2f}   {t_hf_gguf / t_ours:6.2f}x")
    print(f"  GGUF file, both parsing it                              {t_ours_gguf:6.2f}  {t_hf_gguf:8.2f}   {t_hf_gguf / t_ours_gguf:6.2f}x")
    print(f"  safetensors (theirs: our HF export)                     {t_ours:6.2f}  {t_hf_st:8.2f}   {t_hf_st / t_ours:6.2f}x")

    print("\nforward, fp32, logits for every position     ours tok/s   transformers tok/s   ratio")
    for batch, length in [(1, 128), (1, 512), (4, 512), (1, 2048)]:
        tokens = torch.randint(0, model.args.vocab_size, (batch, length))
        ours = forward_tokens_per_s(model, tokens, a.repeat)
        theirs = forward_tokens_per_s(lambda x: hf(x).logits, tokens, a.repeat)
        print(f"  batch {batch} x {length:5d}                          {ours:9.0f}   {theirs:14.0f}      {ours / theirs:5.2f}x")

    if a.ppl_windows is not None:  # eval.py's own windows and loss for both models
        ppl = WikiText2(tok, resolve_data_dir(a.data_dir), a.ppl_seq_len, a.ppl_windows)
        ppl_ours, ppl_hf = ppl(model), ppl(Logits(hf))
        protocol = ppl.protocol
        print(f"\nWikiText-2 test, {protocol['tokens']} tokens (BOS: {protocol['bos']}), {protocol['windows']} windows "
              f"of {a.ppl_seq_len}, tail dropped:")
        print(f"  perplexity ours {ppl_ours:.4f}   transformers (GGUF) {ppl_hf:.4f}   diff {abs(ppl_ours - ppl_hf):.2e}")


if __name__ == "__main__":
    cli_main(main)
