"""GGUF, llama.cpp's file format: read one into our model's config and weights, and write our model as one.

    args, state, tokenizer = read_gguf(Path("m.gguf"))          # checkpoint.load() calls this for a .gguf
    write_gguf(model, vocab_of(tokenizer), "m.gguf", gguf_type="q8_0")   # export.py calls this

What llama.cpp reads for a Llama (its src/llama-model.cpp, src/models/llama.cpp, src/llama-vocab.cpp):
- q/k rows in Meta's interleaved RoPE order (llama.cpp's "normal" RoPE rotates pairs of consecutive values; its
  Hugging Face converter permutes HF's halves back), which is our model's order: the rows go out unchanged;
- `llama.embedding_length` is the residual width and `llama.attention.key_length` the head size, so a PAT-narrowed
  model (width != heads x head_dim) is a plain Llama there; `llama.rope.dimension_count` must equal the head size;
- Llama 3.1's RoPE scaling as a `rope_freqs.weight` tensor of per-frequency divisors (no metadata key);
- a tied head as an absent `output.weight`;
- the vocabulary: SentencePiece (`llama`: tokens, scores, types) or byte-level BPE (`gpt2`: tokens, types, merges,
  pre-tokenizer name), BOS/EOS ids and whether to add BOS.
q8_0 quantizes each 2-D weight whose rows are a multiple of 32 wide and writes the others f16, as llama.cpp's own
converter falls back; 1-D norms stay f32 in every type. The `gguf` package is imported only here, only when a GGUF
is read or written.
"""
import dataclasses
import re
from pathlib import Path

import numpy as np
import torch

from cli import UserError, atomic_write
from model import ModelArgs, rope_frequencies
from tokenizer import BYTE, SentencePieceBPETokenizer, Vocab, bpe_tokenizer_from_vocab, sentencepiece_merges

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# our module names -> GGUF's (blk.{i}. prefixed inside a block)
GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
              "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
OUR_NAMES = {v: k for k, v in GGUF_NAMES.items()}
LLAMA_CPP_PRE = {"gpt2": "gpt-2"}  # Vocab.pre -> llama.cpp's tokenizer.ggml.pre where the two differ
LLAMA31_DEFAULTS = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def _gguf():
    try:
        import gguf
        return gguf
    except ImportError:
        raise UserError("GGUF files need the gguf package: pip install gguf") from None


def gguf_name(name: str) -> str:
    """Our state-dict name -> GGUF's: layers.3.attention.wq.weight -> blk.3.attn_q.weight."""
    m = re.fullmatch(r"(?:layers\.(\d+)\.)?(.+)\.weight", name)
    return (f"blk.{m.group(1)}." if m.group(1) else "") + GGUF_NAMES[m.group(2)] + ".weight"


def rope_divisors(args: ModelArgs) -> torch.Tensor:
    """Per-frequency divisors of the RoPE frequencies that Llama 3.1's scaling applies (llama.cpp's rope_freqs)."""
    return rope_frequencies(dataclasses.replace(args, rope_scaling=None)) / rope_frequencies(args)


def rope_scaling_from_divisors(args: ModelArgs, divisors: np.ndarray, source) -> dict | None:
    """The rope_scaling whose divisors are `divisors`: Llama 3.1's parameters with the factor read off the table
    (only the divisors enter the model, so any parameters that reproduce them give the same model)."""
    if np.allclose(divisors, 1.0):
        return None
    for factor in dict.fromkeys((float(divisors.max()), 8.0, 16.0, 32.0)):
        scaling = dict(factor=factor, **LLAMA31_DEFAULTS)
        if np.allclose(rope_divisors(dataclasses.replace(args, rope_scaling=scaling)).numpy(), divisors, rtol=1e-5):
            return scaling
    raise UserError(f"{source}: its rope_freqs table is not Llama 3.1's RoPE scaling, which is all we implement")


# ----------------------------------------------------------------------------- reading

def read_gguf(path: Path):
    """(ModelArgs, state dict in float32, tokenizer or None) of a llama-architecture GGUF."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}; the file is truncated or corrupt") from None

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    if field("general.architecture") != "llama":
        raise UserError(f"{path}: GGUF architecture is '{field('general.architecture')}', only llama is supported")
    dim, n_heads = field("llama.embedding_length"), field("llama.attention.head_count")
    tensors = {t.name: t for t in reader.tensors}
    args = ModelArgs(dim=dim, n_layers=field("llama.block_count"), n_heads=n_heads,
                     n_kv_heads=field("llama.attention.head_count_kv"),
                     vocab_size=field("llama.vocab_size") or len(field("tokenizer.ggml.tokens")),
                     hidden_dim=field("llama.feed_forward_length"),
                     head_dim=field("llama.attention.key_length") or field("llama.rope.dimension_count") or dim // n_heads,
                     norm_eps=field("llama.attention.layer_norm_rms_epsilon", 1e-5),
                     rope_theta=field("llama.rope.freq_base", 10000.0),
                     max_seq_len=field("llama.context_length", 4096), tie_embeddings="output.weight" not in tensors)
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        args.rope_scaling = rope_scaling_from_divisors(args, gguf.dequantize(t.data, t.tensor_type), path)
    state = {}
    for t in reader.tensors:
        m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", t.name)
        if not m or m.group(2) not in OUR_NAMES:
            continue  # rope_freqs: read into args.rope_scaling above
        name = (f"layers.{m.group(1)}." if m.group(1) else "") + OUR_NAMES[m.group(2)] + ".weight"
        state[name] = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())  # q/k already in Meta's order
    return args, state, tokenizer_of(field, path)


def tokenizer_of(field, path):
    """The tokenizer a GGUF carries: byte-level BPE (gpt2) with its merges, or SentencePiece (llama) from its scores
    (merged as llama.cpp does: the highest-scored piece first, <0xXX> byte tokens for what no piece covers)."""
    model, tokens, types = field("tokenizer.ggml.model"), field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    if model == "gpt2":
        return bpe_tokenizer_from_vocab(tokens, types, bos, eos, bool(field("tokenizer.ggml.add_bos_token", False)),
                                        field("tokenizer.ggml.pre", "gpt2"), merges=field("tokenizer.ggml.merges"))
    if model == "llama":
        vocab = Vocab("llama", list(tokens), [int(t) for t in types], [float(s) for s in field("tokenizer.ggml.scores")],
                      None, None, bos, eos, bool(field("tokenizer.ggml.add_bos_token", True)))
        vocab.merges = sentencepiece_merges(vocab)
        return SentencePieceBPETokenizer(vocab, {}, "legacy", byte_fallback=BYTE in vocab.token_types,
                                         ignore_merges=False, split=False)
    raise UserError(f"{path}: its tokenizer is '{model}'; we read llama.cpp's gpt2 (BPE) and llama (SentencePiece)")


# ----------------------------------------------------------------------------- writing

def tensor_type(gguf, shape: tuple, gguf_type: str):
    """The GGML type one tensor is stored in: 1-D tensors f32; q8_0 rows not a multiple of 32 wide f16."""
    q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return q.F32
    if gguf_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
        return q.F16
    return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[gguf_type]


def add_vocab(writer, vocab, vocab_size: int, source: str) -> None:
    """The tokenizer metadata llama.cpp reads; rows of the embedding beyond the tokenizer become unused [PAD] tokens."""
    tokens, types = list(vocab.tokens), [int(t) for t in vocab.token_types]
    if len(tokens) > vocab_size:
        raise UserError(f"{source}: the tokenizer has {len(tokens)} tokens but the model only {vocab_size} rows: "
                        f"the tokenizer belongs to another model")
    n_pad = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [5] * n_pad  # UNUSED
    writer.add_tokenizer_model(vocab.model)
    if vocab.model == "gpt2":  # llama.cpp refuses a name it does not know, and splits text by default without one
        if vocab.pre is None:
            raise UserError(f"{source}: the tokenizer's split regex has no llama.cpp pre-tokenizer name (we know "
                            f"GPT-2's, SmolLM2's and Llama 3's): llama.cpp would split text differently")
        writer.add_tokenizer_pre(LLAMA_CPP_PRE.get(vocab.pre, vocab.pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if vocab.scores is not None:
        writer.add_token_scores([float(s) for s in vocab.scores] + [-1000.0] * n_pad)
    if vocab.merges:
        writer.add_token_merges(list(vocab.merges))
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(bool(vocab.add_bos))


def write_gguf(model, vocab, path, gguf_type: str = "f16") -> None:
    """Our model and its vocabulary (tokenizer.vocab_of) as a llama-architecture GGUF at `path` (written
    atomically), tensors stored as `gguf_type`."""
    gguf = _gguf()
    a = model.args
    if a.slorb_k:
        raise UserError("this model has SLoRB branches, which no engine's Llama has: keep it in our format")
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    if vocab is None:
        raise UserError("a GGUF carries its tokenizer and this model has none: load it with its tokenizer")
    state = {k: v for k, v in model.state_dict().items() if not (a.tie_embeddings and k == "output.weight")}
    plan = [(gguf_name(k), v) for k, v in state.items()]
    if a.rope_scaling:
        plan.append(("rope_freqs.weight", rope_divisors(a)))

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        writer.add_vocab_size(a.vocab_size)
        writer.add_context_length(a.max_seq_len)
        writer.add_embedding_length(a.dim)
        writer.add_block_count(a.n_layers)
        writer.add_feed_forward_length(a.hidden_dim)
        writer.add_head_count(a.n_heads)
        writer.add_head_count_kv(a.n_kv_heads)
        writer.add_key_length(a.head_dim)
        writer.add_value_length(a.head_dim)
        writer.add_rope_dimension_count(a.head_dim)
        writer.add_rope_freq_base(a.rope_theta)
        writer.add_layer_norm_rms_eps(a.norm_eps)
        add_vocab(writer, vocab, a.vocab_size, str(path))
        types = [tensor_type(gguf, tuple(v.shape), gguf_type) for _, v in plan]
        for (name, v), qtype in zip(plan, types):  # tensor infos first: the data is then written one tensor at a time
            shape = tuple(v.shape)
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            is_float = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            writer.add_tensor_info(name, shape if is_float else byte_shape,
                                   np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else
                                            np.float16 if is_float else np.uint8),
                                   int(np.prod(byte_shape)), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (name, v), qtype in zip(plan, types):
            writer.write_tensor_data(gguf.quants.quantize(v.detach().float().cpu().numpy(), qtype))
        writer.close()

    atomic_write(path, write)
