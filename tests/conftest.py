import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_and_clean_param_store():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    torch.set_default_dtype(default)
