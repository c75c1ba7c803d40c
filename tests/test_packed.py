"""packed.py: the compressed 2:4 format (bit packing, one weight, 4-bit values, refusals); runs on CPU."""
import json

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


def position_bytes(code, out, n_in):
    """pattern: one code per group of 4, three a byte; 2bit: 2 bits per kept value, four a byte."""
    return -(-(out * n_in // 4) // 3) if code == "pattern" else -(-(out * n_in // 2) // 4)


@pytest.mark.parametrize("code", packed.POSITIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_exact(dtype, code):
    w = random_2to4(48, 40, dtype)  # 48 * 20 kept values: 240 bytes of 2-bit positions, 160 of pattern codes
    w[0] = 0  # groups with fewer than 2 nonzeros: padded with zero-valued positions
    w[1, 1:4] = 0
    w[2, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])
    for mask in (None, nm_mask((w.float() + 1e-3 * (w == 0)).abs(), 2, 4)):  # a mask may keep a weight that is 0
        values, positions = packed.pack_weight(w, packed.check_2to4("w", w, mask), code)
        assert values.shape == (48, 20) and values.dtype == dtype and positions.numel() == position_bytes(code, 48, 40)
        back = packed.unpack_weight(values, positions, w.shape, code)
        assert back.dtype == dtype and torch.equal(back, w)
    for shape in ((3, 12), (1, 4), (5, 8), (7, 20), (2, 16)):  # 9, 1, 10, 35, 8 groups: the last byte partly padding
        odd = random_2to4(*shape, dtype, seed=sum(shape))
        values, positions = packed.pack_weight(odd, packed.check_2to4("odd", odd), code)
        assert positions.numel() == position_bytes(code, *shape)
        assert torch.equal(packed.unpack_weight(values, positions, odd.shape, code), odd)


def test_pattern_codes_layout_every_pattern_and_every_byte():
    """The 6 patterns in their documented order, three groups a byte as c0 + 6 c1 + 36 c2, padded with code 0;
    all 216 byte values decode to distinct triples and encode back; a byte >= 216 is refused."""
    assert packed.PATTERNS.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    w = torch.zeros(1, 28)  # 7 groups: every pattern once (codes 0..5), then pattern (1, 3) again
    for g, (a, b) in enumerate(packed.PATTERNS.tolist() + [[1, 3]]):
        w[0, 4 * g + a], w[0, 4 * g + b] = g + 1.0, -(g + 1.0)
    values, positions = packed.pack_weight(w, packed.check_2to4("w", w))
    assert positions.tolist() == [0 + 6 * 1 + 36 * 2, 3 + 6 * 4 + 36 * 5, 4]  # last byte: code 4 + two pads
    assert torch.equal(packed.unpack_weight(values, positions, w.shape), w)
    triples = packed.unpack_patterns(torch.arange(216, dtype=torch.uint8), 3 * 216).view(216, 3, 2)
    assert len({tuple(t.flatten().tolist()) for t in triples}) == 216
    assert torch.equal(packed.pack_patterns(triples.view(-1, 2)), torch.arange(216, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"wq\.weight: its pattern-coded positions are corrupt"):
        packed.unpack_weight(values, torch.tensor([78, 216, 4], dtype=torch.uint8), w.shape, name="wq.weight")
    with pytest.raises(UserError, match="corrupt"):  # a byte short
        packed.unpack_weight(values, positions[:2], w.shape)


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
    assert layout["layers.0.attention.wq.weight"]["positions"] == "pattern"  # the default
    packed.save_packed(tensors, layout, tmp_path / packed.PACKED_FILE)
    back = packed.load_packed_state_dict(tmp_path)  # a directory holding packed.safetensors
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))  # a plain safetensors file, no packed metadata
    with pytest.raises(UserError, match="not a packed 2:4 file"):
        packed.load_packed_state_dict(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="cannot read .*missing, truncated or corrupt"):
        packed.read_packed(tmp_path / "nothing.safetensors")


def save_version_1(tensors, layout, path):
    """A file exactly as the version-1 writer made it: 2-bit positions, no "positions" in the layout."""
    layout = {k: {f: v for f, v in e.items() if f != "positions"} for k, e in layout.items()}
    meta = {"format": packed.FORMAT, "version": "1", "layout": json.dumps(layout, separators=(",", ":"))}
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("bits", [0, 4])
def test_version_1_files_still_load_and_unknown_ones_are_refused(tmp_path, bits):
    state = {"layers.0.feed_forward.w2.weight": random_2to4(6, 520, seed=3), "norm.weight": torch.ones(16)}
    names = ["layers.0.feed_forward.w2.weight"]
    old_t, old_l = packed.pack_state_dict(state, names, bits=bits, positions="2bit")
    save_version_1(old_t, old_l, tmp_path / "v1.safetensors")
    new_t, new_l = packed.pack_state_dict(state, names, bits=bits)
    packed.save_packed(new_t, new_l, tmp_path / "v2.safetensors")
    v1 = packed.load_packed_state_dict(tmp_path / "v1.safetensors")
    v2 = packed.load_packed_state_dict(tmp_path / "v2.safetensors")
    assert all(torch.equal(v1[k], v2[k]) for k in state) and (bits or torch.equal(v1[names[0]], state[names[0]]))
    assert (tmp_path / "v2.safetensors").stat().st_size < (tmp_path / "v1.safetensors").stat().st_size
    for version, layout in (("3", new_l), ("2", {k: {**e, "positions": "3bit"} for k, e in new_l.items()})):
        meta = {"format": packed.FORMAT, "version": version, "layout": json.dumps(layout)}
        save_file(new_t, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(UserError, match="re-pack it"):
            packed.read_packed(tmp_path / "bad.safetensors")


def test_quantize4_with_a_given_grid_and_refusals():
    values = torch.randn(4, 256)
    codes, scales, mins = packed.quantize4(values, 128)
    back = packed.dequantize4(codes, scales, mins, values.shape, 128)
    again = packed.quantize4(back, 128, (scales, mins))  # values on the grid: the same codes
    assert torch.equal(again[0], codes) and again[1] is scales
    w = random_2to4(4, 512)
    with pytest.raises(UserError, match="needs --bits 4"):
        packed.pack_state_dict({"w": w}, ["w"], grids={"w": (scales, mins)})
    with pytest.raises(UserError, match=r"w: its 4-bit grid has shape \(4, 2\), not .* \(4, 1\)"):
        packed.pack_state_dict({"w": w}, ["w"], bits=4, group_size=256, grids={"w": (scales, mins)})
    with pytest.raises(UserError, match="--positions '3bit'"):
        packed.pack_state_dict({"w": w}, ["w"], positions="3bit")


def test_quantize4_reproduces_the_gguf_q4_1_weights_of_smollm2_at_32_inputs_per_group(smollm2):
    """An independent reference for the 4-bit grid: SmolLM2's weights come from llama.cpp's Q4_1 (a scale and a
    min per 32 inputs, 16 levels), so asymmetric 4-bit with groups of 32 must give them back exactly; groups of
    128 put four Q4_1 grids on one and must not (that is why 4-bit g128 costs SmolLM2 so much)."""
    model, _ = smollm2
    for name in ("layers.0.attention.wq", "layers.0.feed_forward.w2", "layers.29.feed_forward.w1"):
        w = model.get_submodule(name).weight.detach()
        back = packed.dequantize4(*packed.quantize4(w, 32), w.shape, 32)
        torch.testing.assert_close(back, w, rtol=0, atol=1e-6 * w.abs().max().item())
        coarse = packed.dequantize4(*packed.quantize4(w, 128), w.shape, 128)
        assert (coarse - w).norm() > 0.02 * w.norm()
