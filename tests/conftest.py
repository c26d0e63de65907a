import pyro
import pytest
import torch

# The tests' tensors are small: torch's intra-op threads cost more than they
# give (a cbpp fit by curvi.glmm took 0.25 s on one thread and 1.7 s on two,
# with another process on the second core), and on a shared CI machine their
# spin-waits make run times erratic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_clean_param_store():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    torch.set_default_dtype(default)
