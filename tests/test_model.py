"""model.py: our Llama against transformers' LlamaForCausalLM on the same weights (GQA, tied head, Llama 3.1's
scaled RoPE), the KV cache and generate, bf16, and training after an inference-mode evaluation.
The checkpoint formats themselves are tested in test_checkpoint.py."""
import pytest
import torch

from checkpoint import load
from model import Transformer


def test_forward_matches_transformers(hf_case, tmp_path):
    """The HF reference's weights, moved in through its safetensors (checkpoint.load), give its logits."""
    case, hf, tokens, ref = hf_case
    hf.save_pretrained(tmp_path)
    model, _ = load(tmp_path, tokenizer=False)
    assert model.args.tie_embeddings == case["tie"]
    torch.testing.assert_close(model(tokens), ref, rtol=1e-4, atol=1e-4)


def test_kv_cache_and_generate_match_full_forward(tiny_args):
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    tokens = torch.randint(0, 256, (2, 24))
    full = model(tokens)
    model.setup_cache(2, 24)
    parts = [model(tokens[:, :10], start_pos=0), model(tokens[:, 10:11], start_pos=10), model(tokens[:, 11:], start_pos=11)]
    model.setup_cache(None, None)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    new = model.generate(tokens[0, :5].tolist(), 6)
    seq = tokens[0, :5].tolist()
    for t in new:  # greedy: each generated token is the argmax of a full forward over what came before
        assert t == int(model(torch.tensor([seq]))[0, -1].argmax())
        seq.append(t)


def test_bf16_forward_close_to_fp32(tiny_args):
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    tokens = torch.randint(0, 256, (1, 32))
    ref = model(tokens)
    out = model.to(torch.bfloat16)(tokens)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_train_after_inference_mode_eval(tiny_args):
    """Evaluating under inference_mode (perplexity) must not poison the RoPE table for a later backward."""
    model = Transformer(tiny_args())
    tokens = torch.randint(0, 256, (1, 16))
    with torch.inference_mode():
        model(tokens)
    model(tokens).sum().backward()
    assert model.layers[0].attention.wq.weight.grad is not None


def test_a_config_that_cant_work_raises_value_error(tiny_args):
    """model.py knows nothing of the CLI: a bad shape is a ValueError (checkpoint.load turns it into a UserError)."""
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of n_kv_heads=3"):
        tiny_args(n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim=15 must be even"):
        tiny_args(head_dim=15)
    with pytest.raises(ValueError, match="slorb_k=5 does not divide the input dim 64"):
        Transformer(tiny_args(slorb_k=5))
    assert tiny_args(n_kv_heads=None).n_kv_heads == 4 and tiny_args().head_dim == 16  # the defaults


def test_return_hidden_is_what_the_head_reads(tiny_args):
    """return_hidden=True: the final normed hidden states, from which `output` gives the usual logits."""
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    tokens = torch.randint(0, 256, (2, 12))
    hidden = model(tokens, return_hidden=True)
    assert hidden.shape == (2, 12, 64)
    torch.testing.assert_close(model.output(hidden).float(), model(tokens), rtol=0, atol=0)


def test_decode_token_by_token_matches_full_forward(tiny_args):
    """A prompt from position 0 (is_causal), then one token at a time (no mask), for two rows at once."""
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    tokens = torch.randint(0, 256, (2, 20))
    full = model(tokens)
    model.setup_cache(2, 20)
    steps = [model(tokens[:, :7], start_pos=0)] + [model(tokens[:, t:t + 1], start_pos=t) for t in range(7, 20)]
    model.setup_cache(None, None)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_attention_calls_sdpa_so_a_fused_kernel_can_run(tiny_args, monkeypatch):
    """Flash takes GQA and is_causal but no mask: training, a prompt from 0 and one-query decode pass no mask; a
    masked call (a chunk after the prompt, eval's packed rows) repeats k/v to q's heads instead of enable_gqa."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        calls.append((attn_mask is not None, is_causal, enable_gqa, q.shape[1], k.shape[1]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = Transformer(tiny_args(n_layers=1)).eval()  # 4 query heads, 2 kv heads
    tokens = torch.randint(0, 256, (1, 12))
    model(tokens)
    model.setup_cache(1, 12)
    model(tokens[:, :6], start_pos=0)
    model(tokens[:, 6:7], start_pos=6)
    model(tokens[:, 7:], start_pos=7)
    model.setup_cache(None, None)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    model.layers[0](model.tok_embeddings(tokens), model.rope(0, 12, "cpu"), mask=causal)  # as eval.packed_hidden
    #             (mask,  is_causal, enable_gqa, q heads, k heads)
    assert calls == [(False, True, True, 4, 2),  # training / a full forward
                     (False, True, True, 4, 2),  # a prompt from position 0
                     (False, False, True, 4, 2),  # one query: sees the whole cache
                     (True, False, False, 4, 4),  # a chunk after the prompt
                     (True, False, False, 4, 4)]  # an explicit mask
