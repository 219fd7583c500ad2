import pytest
import torch

# Results are bit-identical for a fixed seed only at a fixed thread count.
torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
