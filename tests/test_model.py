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
