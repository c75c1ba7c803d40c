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
