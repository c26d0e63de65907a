"""The bundled data sets load as documented and reproduce their published fits."""

import torch

from curvi.datasets import PIMA_GLM, load_cbpp, load_pima


def test_pima_reproduces_r_glm():
    """Maximum-likelihood logistic regression (Newton, float64) on the bundled
    Pima data matches R's glm to its printed precision."""
    data = load_pima(dtype=torch.float64)
    assert data.X.shape == (532, 7) and data.raw.shape == (532, 7)
    assert int(data.y.sum()) == 177
    X = torch.cat([torch.ones(532, 1, dtype=torch.float64), data.X], 1)
    w = torch.zeros(8, dtype=torch.float64)
    for _ in range(25):
        p = torch.sigmoid(X @ w)
        grad = X.T @ (data.y - p)
        info = X.T @ (X * (p * (1 - p)).unsqueeze(-1))
        w = w + torch.linalg.solve(info, grad)
    log_lik = (data.y * (X @ w) - torch.nn.functional.softplus(X @ w)).sum()
    se = torch.linalg.inv(info).diagonal().sqrt()
    assert torch.allclose(w, torch.tensor(PIMA_GLM["coefficients"], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(se, torch.tensor(PIMA_GLM["std_errors"], dtype=torch.float64), atol=1e-8)
    assert abs(float(log_lik) - PIMA_GLM["log_likelihood"]) < 1e-6


def test_cbpp_loads():
    data = load_cbpp(dtype=torch.float64)
    assert data.design.shape == (56, 4) and data.num_herds == 15
    assert int(data.incidence.sum()) == 99 and int(data.size.sum()) == 842  # as in R: sum(cbpp$incidence)
