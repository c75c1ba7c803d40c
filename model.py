"""A Llama in one file: RMSNorm, rotary embeddings (Meta's interleaved layout), grouped-query attention,
SwiGLU MLP, tied or separate LM head, a KV cache and a small `generate`.

Every projection is a plain bias-free nn.Linear with Meta's names (wq wk wv wo w1 w2 w3), so pruning code
finds them as `layers.{i}.attention.wq` ... `layers.{i}.feed_forward.w3`. `head_dim` is its own field:
a model whose hidden size was pruned has n_heads * head_dim != dim. A configuration that can't work raises
ValueError (checkpoint.py reports it as one line).

    from checkpoint import load   # loading lives with the formats; this file imports nothing of the project
    model, tokenizer = load("smollm2-135m", device="cpu", dtype=torch.float32)
    logits = model(torch.tensor([tokenizer.encode("Hello")]))   # (B, T, vocab), float32
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# the seven projections of every block, by Meta's names: what pruning methods prune
PROJECTIONS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# the same projections in the order a block applies them; those in one stage read the same input
PROJECTION_STAGES = (("attention.wq", "attention.wk", "attention.wv"), ("attention.wo",),
                     ("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",))


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
    vocab_size: int = 32000
    hidden_dim: int = 11008  # MLP width
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    slorb_k: int = 0  # AST's SLoRB side branch on the 7 projections (train_ast.py); 0 = none

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # normalise in fp32 whatever the model dtype, as Meta and HF do
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device=None):
    """theta_i = rope_theta^(-2i/head_dim), with Llama 3.1's smooth low-frequency scaling when configured."""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device, dtype=torch.int64).float()
                                         / args.head_dim)
    s = args.rope_scaling
    if not s:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long wavelengths: divide by factor
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)  # in between: interpolate
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, freqs_cis):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle pos·θ_i: as complex numbers, times e^(i·pos·θ_i) (Meta's layout)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs_cis).flatten(-2).type_as(x)


class SLoRBLinear(nn.Linear):
    """A bias-free linear layer plus AST's SLoRB branch y += S (X x) (arXiv 2407.20584): X (in/k, in) sums
    each group of k inputs, S (out, in/k) weighs each group; a separate dense matmul at inference."""

    def __init__(self, in_features, out_features, k):
        if in_features % k:
            raise ValueError(f"slorb_k={k} does not divide the input dim {in_features}")
        super().__init__(in_features, out_features, bias=False)
        self.slorb_x = nn.Parameter(torch.zeros(in_features // k, in_features))
        self.slorb_s = nn.Parameter(torch.zeros(out_features, in_features // k))

    def forward(self, x):
        return super().forward(x) + F.linear(F.linear(x, self.slorb_x), self.slorb_s)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # (B, n_kv_heads, max_len, head_dim) while generating

    def forward(self, x, freqs_cis, start_pos=None, mask=None):
        """mask: None for plain causal attention, else a boolean (B, 1, T, T) of what each query may see.
        Decode (one query) and a prompt from position 0 need no mask, so the flash kernel can run."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if start_pos is not None:
            self.cache_k[:B, :, start_pos:start_pos + T] = k
            self.cache_v[:B, :, start_pos:start_pos + T] = v
            k, v = self.cache_k[:B, :, :start_pos + T], self.cache_v[:B, :, :start_pos + T]
            if start_pos and T > 1:  # a chunk after the prompt: query t, at start_pos + t, sees keys up to there
                pos = torch.arange(start_pos + T, device=x.device)
                mask = pos <= pos[start_pos:, None]
        if mask is not None:  # SDPA's GQA runs in flash (no mask) and math only: repeat k/v for a fused masked kernel
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=mask is None)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis, start_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.apply(self._init_weights)
        if args.slorb_k:  # SLoRB projections (values come from the checkpoint)
            for block in self.layers:
                for parent in (block.attention, block.feed_forward):
                    for name, lin in list(parent.named_children()):
                        setattr(parent, name, SLoRBLinear(lin.in_features, lin.out_features, args.slorb_k))
        self._rope_cache = {}  # plain attribute, not a buffer: .to(bfloat16) must not round the angles

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def rope(self, start, length, device):
        """e^(i·pos·θ) for positions start .. start+length-1 (complex64), shaped to broadcast over heads."""
        end = start + length
        table = self._rope_cache.get(device)
        if table is None or table.shape[0] < end:
            n = max(end, min(self.args.max_seq_len, 8192))
            with torch.inference_mode(False):  # a table made during eval must still serve training later
                angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32),
                                     rope_frequencies(self.args, device))
                table = self._rope_cache[device] = torch.polar(torch.ones_like(angles), angles)
        return table[start:end, None, :]

    def forward(self, tokens, start_pos=None, return_hidden=False):
        """Logits (B, T, vocab) in float32. start_pos=None: plain causal pass; an int: use the KV cache.
        return_hidden: the final normed hidden states (B, T, dim) instead, for a loss that applies `output` itself
        a chunk of tokens at a time (whole fp32 logits are 4 GB at 8k tokens and a 128k vocabulary)."""
        h = self.tok_embeddings(tokens)
        freqs_cis = self.rope(start_pos or 0, tokens.shape[1], tokens.device)
        for layer in self.layers:
            h = layer(h, freqs_cis, start_pos)
        h = self.norm(h)
        return h if return_hidden else self.output(h).float()

    def setup_cache(self, batch_size, max_len):
        """Allocate the KV cache (None frees it)."""
        w = self.layers[0].attention.wk.weight
        for layer in self.layers:
            a = layer.attention
            shape = (batch_size, a.n_kv_heads, max_len, a.head_dim)
            a.cache_k = None if batch_size is None else torch.zeros(shape, device=w.device, dtype=w.dtype)
            a.cache_v = None if batch_size is None else torch.zeros(shape, device=w.device, dtype=w.dtype)

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, eos_id=None):
        """Continue one prompt (a list of ids); greedy at temperature 0. Returns the new ids."""
        device = self.tok_embeddings.weight.device
        self.setup_cache(1, len(prompt_ids) + max_new_tokens)
        try:
            logits = self(torch.tensor([prompt_ids], device=device), start_pos=0)[:, -1]
            pos, out = len(prompt_ids), []
            for _ in range(max_new_tokens):
                if temperature > 0:
                    nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
                else:
                    nxt = logits.argmax(-1, keepdim=True)
                out.append(int(nxt))
                if out[-1] == eos_id:
                    break
                logits = self(nxt, start_pos=pos)[:, -1]
                pos += 1
            return out
        finally:
            self.setup_cache(None, None)

