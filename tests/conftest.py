from pathlib import Path

import pytest
import torch
from support import trainer

# Results are bit-identical for a fixed seed only at a fixed thread count.
torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("small") / "run"
    trainer(out, "run.steps=2", "run.checkpoint_every=1").train(show_progress=False)
    return out
