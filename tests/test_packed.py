"""packed.py: the compressed 2:4 format (bit packing, one weight, 4-bit values, refusals); runs on CPU."""
import pytest
import torch
from safetensors.torch import save_file

import packed
from cli import UserError
from sparsity import nm_mask


def random_2to4(out, n_in, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g).to(dtype)
    return w * nm_mask(w.abs().float(), 2, 4)


def test_pack_bits_layout_and_roundtrip():
    # first value in the low bits: [1, 2, 3, 0] -> 0b00_11_10_01
    assert packed.pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert packed.pack_bits(torch.tensor([5, 12]), 4).tolist() == [12 << 4 | 5]
    for bits in (2, 4):
        for n in (1, 3, 4, 5, 1001):  # lengths that are not a multiple of the values per byte
            x = torch.randint(0, 2 ** bits, (n,))
            p = packed.pack_bits(x, bits)
            assert p.dtype == torch.uint8 and p.numel() == -(-n * bits // 8)
            assert torch.equal(packed.unpack_bits(p, bits, n), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_exact(dtype):
    w = random_2to4(48, 40, dtype)  # 48 * 20 kept values: positions fill 240 bytes
    w[0] = 0  # groups with fewer than 2 nonzeros: padded with zero-valued positions
    w[1, 1:4] = 0
    w[2, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])
    for mask in (None, nm_mask((w.float() + 1e-3 * (w == 0)).abs(), 2, 4)):  # a mask may keep a weight that is 0
        values, positions = packed.pack_weight(w, packed.check_2to4("w", w, mask))
        assert values.shape == (48, 20) and values.dtype == dtype and positions.numel() == 48 * 20 // 4
        back = packed.unpack_weight(values, positions, w.shape)
        assert back.dtype == dtype and torch.equal(back, w)
    odd = random_2to4(3, 12, dtype)  # 18 kept values: the last position byte is partly padding
    values, positions = packed.pack_weight(odd, packed.check_2to4("odd", odd))
    assert positions.numel() == 5 and torch.equal(packed.unpack_weight(values, positions, odd.shape), odd)


def test_non_2to4_weight_is_refused_with_its_name():
    dense = torch.randn(8, 16)
    with pytest.raises(UserError, match=r"layers\.3\.feed_forward\.w2\.weight: not 2:4"):
        packed.pack_state_dict({"layers.3.feed_forward.w2.weight": dense}, ["layers.3.feed_forward.w2.weight"])
    with pytest.raises(UserError, match=r"wq\.weight: shape \(8, 10\)"):
        packed.check_2to4("wq.weight", torch.zeros(8, 10))
    w = random_2to4(8, 16)
    wrong_mask = ~nm_mask(w.abs(), 2, 4)  # keeps exactly the zeros
    with pytest.raises(UserError, match="nonzeros outside its mask"):
        packed.check_2to4("wk.weight", w, wrong_mask)


def test_quantize4_error_bound():
    """Every kept value is within scale/2 of its 4-bit reconstruction (min rounded down, scale up, to fp16);
    the only slack allowed is the float32 rounding of min + q * scale."""
    g = torch.Generator().manual_seed(1)
    values = torch.randn(7, 300, generator=g) * torch.logspace(-4, 1, 7).unsqueeze(1)  # 300 = 2 x 128 + 44
    values[0, :128] = 0.37  # a constant group: scale 0 or tiny, still within bound
    values[1, 5] = 40.0  # an outlier widens only its own group
    codes, scales, mins = packed.quantize4(values, 128)
    assert codes.numel() == 7 * 300 // 2 and scales.shape == mins.shape == (7, 3)
    assert scales.dtype == mins.dtype == torch.float16
    back = packed.dequantize4(codes, scales, mins, values.shape, 128)
    s = scales.float().repeat_interleave(128, dim=1)[:, :300]
    err = (back - values).abs()
    assert (err <= 0.5 * s + 2 ** -20 * values.abs()).all()
    assert err[0, :128].max() <= 1e-4  # constant group
    assert err.max() > 0  # it is a lossy code, and the test would notice a no-op


def test_state_dict_roundtrip_and_other_files_refused(tmp_path):
    state = {"layers.0.attention.wq.weight": random_2to4(8, 16), "norm.weight": torch.ones(16)}
    tensors, layout = packed.pack_state_dict(state, ["layers.0.attention.wq.weight"])
    packed.save_packed(tensors, layout, tmp_path / packed.PACKED_FILE)
    back = packed.load_packed_state_dict(tmp_path)  # a directory holding packed.safetensors
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))  # a plain safetensors file, no packed metadata
    with pytest.raises(UserError, match="not a packed 2:4 file"):
        packed.load_packed_state_dict(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="cannot read .*missing, truncated or corrupt"):
        packed.read_packed(tmp_path / "nothing.safetensors")
