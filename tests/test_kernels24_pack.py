"""kernels24/pack.py: the command that packs a 2:4 checkpoint (round trips through checkpoint.load, the file's
byte arithmetic, CLI errors); runs on CPU with tiny models, plus the real SmolLM2-135M (slow)."""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import checkpoint
import packed
import sparsity
from checkpoint import load
from cli import UserError
from kernels24 import pack
from model import PROJECTIONS, ModelArgs, Transformer


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=64)
    return Transformer(ModelArgs(**{**args, **overrides})).eval()


class ByteTokenizer:
    """Just enough of the tokenizer interface for checkpoint.save (the pack CLI copies its files)."""
    def save(self, out_dir):
        (Path(out_dir) / "tokenizer_stub.txt").write_text("bytes")


def make_2to4_checkpoint(tmp_path, m, tok=None):
    masks = sparsity.prune(m, "magnitude", (2, 4))
    checkpoint.save(m, tok or ByteTokenizer(), tmp_path / "ckpt", masks=masks)
    return tmp_path / "ckpt", masks


def check_file_arithmetic(path: Path, report: dict, bits: int, value_bytes: int, group_size: int = 128):
    """The file is exactly header + packed parts + dense tensors, and the packed parts match the formula."""
    tensors, layout = packed.read_packed(path)
    sizes = pack.expected_bytes(layout, tensors)
    assert path.stat().st_size == pack.header_bytes(path) + sizes["packed"] + sizes["dense"]
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == sizes["packed"] + sizes["dense"]
    expected = 0
    for e in layout.values():
        out, n_in = e["shape"]
        kept = out * n_in // 2
        # positions: pattern codes, 3 groups of 4 a byte, the last one padded (the default); or 2 bits per kept
        # value (kept is a multiple of 4 for these shapes)
        expected += -(-(kept // 2) // 3) if e["positions"] == "pattern" else kept // 4
        expected += kept * value_bytes if bits == 0 else kept // 2 + out * -(-(n_in // 2) // group_size) * 4
    assert sizes["packed"] == expected == report["packed_bytes"]
    return tensors, layout


@pytest.mark.parametrize("tie", [False, True])
def test_pack_checkpoint_roundtrip_tiny(tmp_path, tie):
    m = tiny_model(tie_embeddings=tie)
    ckpt, masks = make_2to4_checkpoint(tmp_path, m)
    report = pack.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "packed")])
    out = tmp_path / "packed"
    assert (out / "packed.safetensors").exists() and not (out / "model.safetensors").exists()
    assert (out / "params.json").exists() and (out / "tokenizer_stub.txt").exists()
    assert not (out / "masks.safetensors").exists()  # the positions hold the masks
    with safe_open(str(out / "packed.safetensors"), framework="pt") as f:
        meta = f.metadata()
    layout = json.loads(meta["layout"])
    assert meta["format"] == packed.FORMAT and set(layout) == {k + ".weight" for k in masks}
    assert layout["layers.0.attention.wk.weight"] == {"shape": [32, 64], "dtype": "float32", "positions": "pattern"}
    check_file_arithmetic(out / "packed.safetensors", report, 0, 4)
    assert report["n_packed_weights"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128)
    m2, _ = load(out, tokenizer=False)
    assert m2.output.weight is m2.tok_embeddings.weight if tie else True
    x = torch.randint(256, (2, 17))
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))  # exact: same weights, bit for bit


def test_pack_2bit_positions_flag(tmp_path):
    """--positions 2bit writes the older code (4 bits per group instead of 2.67): same weights, bigger file."""
    m = tiny_model()
    ckpt, masks = make_2to4_checkpoint(tmp_path, m)
    sizes = {}
    for code in ("2bit", "pattern"):
        report = pack.main(["--ckpt", str(ckpt), "--out", str(tmp_path / code), "--positions", code, "--bits", "4",
                            "--group-size", "32"])
        tensors, layout = check_file_arithmetic(tmp_path / code / "packed.safetensors", report, 4, 0, 32)
        assert {e["positions"] for e in layout.values()} == {code}
        sizes[code] = report["packed_bytes"]
        m2, _ = load(tmp_path / code, tokenizer=False)
        if code == "2bit":
            ref = m2.state_dict()
        else:
            assert all(torch.equal(ref[k], v) for k, v in m2.state_dict().items())
    n = report["n_packed_weights"]
    assert sizes["2bit"] - sizes["pattern"] == pytest.approx(n / 8 - n / 12, abs=14)  # 1/8 vs 1/12 byte a weight


def test_pack_without_masks_takes_the_seven_projections(tmp_path):
    m = tiny_model()
    sparsity.prune(m, "magnitude", (2, 4))
    checkpoint.save(m, ByteTokenizer(), tmp_path / "ckpt")  # no masks.safetensors
    out = tmp_path / "packed"
    pack.main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "bfloat16"])
    tensors, layout = packed.read_packed(out)
    assert sorted(layout) == sorted(f"layers.{i}.{p}.weight" for i in range(2) for p in PROJECTIONS)
    assert all(e["dtype"] == "bfloat16" for e in layout.values())
    assert tensors["norm.weight"].dtype == torch.bfloat16  # --dtype casts every float tensor
    m2, _ = load(out, tokenizer=False)
    for name, w in m.state_dict().items():
        assert torch.equal(m2.state_dict()[name], w.to(torch.bfloat16).float()), name


def test_pack_checkpoint_4bit_tiny(tmp_path):
    m = tiny_model()
    ckpt, masks = make_2to4_checkpoint(tmp_path, m)
    out = tmp_path / "packed4"
    report = pack.main(["--ckpt", str(ckpt), "--out", str(out), "--bits", "4", "--group-size", "32"])
    tensors, layout = check_file_arithmetic(out / "packed.safetensors", report, 4, 0, group_size=32)
    state = packed.load_packed_state_dict(out / "packed.safetensors")
    for name, e in layout.items():
        w, w4 = m.state_dict()[name], state[name]
        keep = masks[name.removesuffix(".weight")]
        assert (w4[~keep] == 0).all()  # pruned entries stay exactly zero
        scale = tensors[name + ".scales"].float().repeat_interleave(32, dim=1)  # 32 kept = 64 inputs per group
        err = (w4 - w)[keep].view(w.shape[0], -1)
        assert (err.abs() <= 0.5 * scale + 2 ** -20 * w[keep].view_as(err).abs()).all()
    m4, _ = load(out, tokenizer=False)
    x = torch.randint(256, (1, 16))
    with torch.no_grad():
        ref, got = m(x), m4(x)
    # weight errors are ~9% (relative) at 4 bits; the logits moved 6.0% when measured: a guard, not a bound
    assert 0 < (got - ref).norm() / ref.norm() < 0.15


def test_pack_cli_errors(tmp_path, cli_error):
    with pytest.raises(UserError, match="no model.safetensors"):
        pack.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "o")])
    m = tiny_model()
    checkpoint.save(m, ByteTokenizer(), tmp_path / "dense")  # dense projections, no masks
    with pytest.raises(UserError, match=r"layers\.0\.attention\.w[qkvo]\.weight: not 2:4 sparse"):
        pack.main(["--ckpt", str(tmp_path / "dense"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="not a packed 2:4 file"):
        packed.load_packed_state_dict(tmp_path / "dense" / "model.safetensors")
    argv = ["--ckpt", str(tmp_path / "dense"), "--out", str(tmp_path / "o")]
    assert cli_error(lambda: pack.main(argv)).startswith("error: layers.0.attention.w")


def test_pack_flags(tmp_path, cli_error, capsys):
    """Every bad flag ends in one line before any work: required paths, --out a directory, ranges, choices."""
    ckpt, _ = make_2to4_checkpoint(tmp_path, tiny_model())
    (tmp_path / "a_file").write_text("")
    bad = {"--ckpt is required": ["--out", str(tmp_path / "o")],
           "--out is required": ["--ckpt", str(ckpt)],
           "--out must differ from --ckpt": ["--ckpt", str(ckpt), "--out", str(ckpt)],
           r"--out .*a_file is a file": ["--ckpt", str(ckpt), "--out", str(tmp_path / "a_file")],
           "--group-size 0: must be positive": ["--ckpt", str(ckpt), "--out", str(tmp_path / "o"),
                                                "--bits", "4", "--group-size", "0"]}
    for message, argv in bad.items():
        with pytest.raises(UserError, match=message):
            pack.main(argv)
        assert message.split(" ")[0] in cli_error(lambda: pack.main(argv))
    assert not (tmp_path / "o").exists()  # nothing written
    # not a choice: argparse's usage error, exit 2
    for argv in (["--bits", "3"], ["--dtype", "float64"], ["--positions", "3bit"], ["--quantizer", "awq"]):
        with pytest.raises(SystemExit) as e:
            pack.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o")] + argv)
        assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_pack_real_smollm2(tmp_path, smollm2):
    """The measured case (bench/pack_smollm2.py prints the same numbers): a magnitude-2:4 SmolLM2-135M."""
    model, tok = smollm2
    m = copy.deepcopy(model)
    ckpt, _ = make_2to4_checkpoint(tmp_path, m, tok)
    x = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is")])
    with torch.no_grad():
        ref = m(x)
    for bits, value_bytes in ((0, 4), (4, 0)):
        out = tmp_path / f"packed{bits}"
        report = pack.main(["--ckpt", str(ckpt), "--out", str(out), "--bits", str(bits)])
        check_file_arithmetic(out / "packed.safetensors", report, bits, value_bytes)
        assert report["n_packed_weights"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
        m2, _ = load(out)
        with torch.no_grad():
            got = m2(x)
        if bits == 0:
            assert torch.equal(got, ref)
            # 2 + 1/12 bytes/weight + the header (~75 KB over 106M weights)
            assert report["linear_compression_vs_fp32"] == pytest.approx(4 / (2 + 1 / 12), rel=1e-3)
        else:  # per-weight bound is tested above; this only guards against a broken layer (measured 0.41)
            assert (got - ref).norm() / ref.norm() < 0.6
            # 0.25 + 1/12 + 4 B per group of 128 kept values, but a 576-input row ends in a group of 32: 11.30x
            assert report["linear_compression_vs_fp32"] > 11.25


def test_pack_never_leaves_a_mixed_folder_and_takes_a_name(tmp_path, cli_error):
    """An existing checkpoint folder as --out: refused; with --overwrite its dense weights go, so load() reads
    the packed ones (before, it kept reading the old model.safetensors). A model name resolves like everywhere."""
    ckpt, _ = make_2to4_checkpoint(tmp_path, tiny_model(seed=1))
    old = tmp_path / "old"
    checkpoint.save(tiny_model(seed=2), ByteTokenizer(), old, meta={"method": "dense"})  # a different model,
    (old / "tokenizer.model").write_bytes(b"its tokenizer")  # which load_tokenizer would read before the copied one
    err = cli_error(lambda: pack.main(["--ckpt", str(ckpt), "--out", str(old)]))
    assert "already holds" in err and "--overwrite" in err
    pack.main(["--ckpt", str(ckpt), "--out", str(old), "--overwrite"])
    assert not (old / "model.safetensors").exists()
    assert not (old / "meta.json").exists() and not (old / "tokenizer.model").exists()
    packed_model, _ = load(old, tokenizer=False)
    source, _ = load(ckpt, tokenizer=False)
    for k, v in source.state_dict().items():
        assert torch.equal(packed_model.state_dict()[k], v), k
    err = cli_error(lambda: pack.main(["--ckpt", "llama9-1b", "--out", str(tmp_path / "x")]))
    assert "checkpoints/llama9-1b" in err  # resolved as a name, not taken for a missing folder


def test_pack_refuses_a_group_larger_than_a_row_before_any_work(tmp_path, cli_error):
    """--group-size 1000000 padded every row to a million values (minutes, no output): a group holds at most one
    row's kept values; the narrowest packed row (64 inputs, 32 kept) sets the limit, which still packs."""
    ckpt, _ = make_2to4_checkpoint(tmp_path, tiny_model())
    for size in ("1000000", "33"):
        err = cli_error(lambda: pack.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--bits", "4",
                                           "--group-size", size]))
        assert err == (f"error: --group-size {size}: larger than the 32 kept values of a row of "
                       f"layers.0.attention.wk.weight (2 of every 4 of its 64 inputs); use at most 32\n")
        assert not (tmp_path / "o" / packed.PACKED_FILE).exists()
    pack.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--bits", "4", "--group-size", "32"])
    pack.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "exact"), "--group-size", "1000000"])  # --bits 0: unused


def test_pack_out_that_cannot_be_written_is_one_line_before_any_work(tmp_path, cli_error, monkeypatch):
    """cli.check_output_dir creates and tests --out at the start (/proc can hold no folder)."""
    ckpt, _ = make_2to4_checkpoint(tmp_path, tiny_model())
    monkeypatch.setattr(checkpoint, "read_safetensors", lambda *a: pytest.fail("read the weights before --out"))
    assert "/proc/x" in cli_error(lambda: pack.main(["--ckpt", str(ckpt), "--out", "/proc/x"]))
