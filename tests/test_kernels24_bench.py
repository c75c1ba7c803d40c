"""kernels24/bench.py on CPU: its flags are checked, and --out made a directory, before it asks for a GPU, and
without one it stops with one line. The numbers themselves need a GPU (README: owed)."""
import pytest
import torch

from kernels24 import bench


def test_bench_needs_cuda(cli_error):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "needs a CUDA GPU" in cli_error(lambda: bench.main([]))


def test_bench_out_is_a_directory(tmp_path, cli_error):
    """--out names a directory (results in <out>/kernels_bench.json), checked and created before the GPU work."""
    (tmp_path / "results.json").write_text("")
    err = cli_error(lambda: bench.main(["--out", str(tmp_path / "results.json")]))
    assert err.startswith("error: --out ") and "is a file" in err
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the run would start")
    out = tmp_path / "new" / "kernels"
    assert "needs a CUDA GPU" in cli_error(lambda: bench.main(["--out", str(out)]))
    assert out.is_dir()


def test_bench_flags(cli_error, capsys):
    """Bad values end in one line naming the flag, before the GPU is asked for."""
    bad = {"--runs 0: must be positive": ["--runs", "0"],
           "--model-runs -1: must be positive": ["--model-runs", "-1"],
           "--decode-steps 0: must be positive": ["--decode-steps", "0"],
           "--tokens 1,x: must be comma-separated positive integers": ["--tokens", "1,x"],
           "--prefill 0,128: must be comma-separated positive integers": ["--prefill", "0,128"],
           "--decode-batch -1: must be comma-separated positive integers": ["--decode-batch=-1"],
           "--models: unknown model 'llama2-7b'": ["--models", "smollm2-135m,llama2-7b"]}
    for message, argv in bad.items():
        assert cli_error(lambda: bench.main(argv)).startswith("error: " + message)
    with pytest.raises(SystemExit) as e:  # not a choice: argparse's usage error, exit 2
        bench.main(["--dtype", "float32"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_logits_check_and_wrong_results():
    """Teacher-forced logits pass with rounding noise that turns some argmaxes (and so a greedy path), fail when
    they are noise; every wrong result or failing backend is listed, and main() then exits 1."""
    torch.manual_seed(0)
    ref = torch.randn(2, 128, 512)
    rounded = ref + 0.013 * ref.norm() / ref.numel() ** 0.5 * torch.randn_like(ref)  # 1.3e-2 relative, as measured
    rel, same, passed = bench.logits_check(rounded, ref)
    assert passed and 1e-2 < rel < 2e-2 and 0.9 <= same < 1.0
    assert not bench.logits_check(torch.randn_like(ref), ref)[2]
    flat = 10 + 0.01 * torch.randn_like(ref)  # a small relative error is not enough: the argmaxes must agree too
    rel, same, passed = bench.logits_check(10 + 0.01 * torch.randn_like(ref), flat)
    assert rel < bench.MAX_LOGITS_REL_ERR and same < 0.1 and not passed
    ok = {"model": "smollm2-135m", "cutlass_logits_ok": True, "cutlass_logits_rel_err": rel,
          "cutlass_argmax_agreement": same, "cutlass": {"prefill_128_ms": 1.0}}
    assert bench.failures({}, [ok], ["cutlass", "cusparselt"]) == []
    wrong = dict(ok, cutlass_logits_ok=False)
    broken = {"cusparselt": "RuntimeError: wrong result: relative error 1.0e+00 vs the dense masked matmul"}
    found = bench.failures(broken, [wrong, {"model": "llama2-7b-random", "cusparselt": "RuntimeError: boom"}],
                           ["cutlass", "cusparselt"])
    assert len(found) == 3 and found[0].startswith("per-linear cusparselt: RuntimeError: wrong result")
    assert "smollm2-135m with cutlass: wrong logits" in found[1] and found[2].endswith("RuntimeError: boom")


def test_bench_exits_1_on_a_wrong_result(tmp_path, monkeypatch, cli_error):
    """The tables and --out are written, then a wrong result ends the run with status 1 (the GPU check's FAIL)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "check_gpu", lambda device, backend: None)
    monkeypatch.setattr(bench, "environment", lambda: {})
    monkeypatch.setattr(bench, "Timer", lambda: None)
    monkeypatch.setattr(bench, "bench_linears", lambda *a: ([], {"cutlass": "RuntimeError: wrong result: 1e+00"}))
    monkeypatch.setattr(bench, "bench_models", lambda *a: [])
    err = cli_error(lambda: bench.main(["--out", str(tmp_path), "--backends", "cutlass"]))
    assert err.startswith("error: 1 wrong result(s) or failing backend(s): per-linear cutlass: RuntimeError: wrong")
    assert (tmp_path / bench.OUT_FILE).exists()
