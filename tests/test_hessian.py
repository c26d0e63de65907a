import pyro
import pyro.distributions as dist
import pytest
import torch
from fd import central_gradient
from models import MODELS
from test_model import random_point

from curvi import ModelView
from curvi.hessian import dense_hessian, gradient, structured_hessian


def view_of(name, **kwargs):
    model, args, plate = MODELS[name](**kwargs)
    return ModelView(model, *args, unit_plate=plate)


@pytest.mark.parametrize("name", MODELS)
def test_structured_hessian_matches_torch_func_hessian(name):
    view = view_of(name)
    for seed in range(2):
        theta, y = random_point(view, seed)
        H = structured_hessian(view, theta, y)
        dense = dense_hessian(view, theta, y)
        assert H.A.shape == (view.global_dim,) * 2
        assert H.B.shape == (view.num_units, view.local_dim, view.global_dim)
        assert H.D.shape == (view.num_units, view.local_dim, view.local_dim)
        torch.testing.assert_close(H.to_dense(), dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", MODELS)
def test_gradient_and_value_match_torch_func(name):
    view = view_of(name)
    theta, y = random_point(view)
    value, (g_theta, g_y) = (
        view.log_joint(theta, y),
        torch.func.grad(view.log_joint, argnums=(0, 1))(theta, y),
    )
    H = structured_hessian(view, theta, y)
    for got in (gradient(view, theta, y), (H.grad_theta, H.grad_y)):
        torch.testing.assert_close(got[0], g_theta, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], g_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H.log_prob, value)


def test_subsampled_plate_hessian_matches_dense():
    obs = torch.randn(12, 3)

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", 12, subsample_size=5, dim=-2) as idx:
            u = pyro.sample("u", dist.Normal(mu, tau))
            with pyro.plate("obs", 3, dim=-1):
                pyro.sample("z", dist.StudentT(4.0, u, 0.5), obs=obs[idx])

    view = ModelView(model, obs, unit_plate="groups")
    units = torch.tensor([0, 3, 4, 8, 11])
    theta, y = torch.tensor([0.1, -0.2]), torch.randn(5, 1)
    H = structured_hessian(view, theta, y, units=units)
    torch.testing.assert_close(H.to_dense(), dense_hessian(view, theta, y, units=units))


def count_backward_passes(monkeypatch):
    calls = []
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    return calls


@pytest.mark.parametrize("num_groups", [10, 400])
def test_cost_is_p_plus_k_products_whatever_n(num_groups, monkeypatch):
    view = view_of("logistic_long", num_groups=num_groups)
    forwards = []
    log_joint = view.log_joint
    view.log_joint = lambda *a, **kw: forwards.append(1) or log_joint(*a, **kw)
    calls = count_backward_passes(monkeypatch)
    structured_hessian(view, view.init_theta, view.init_y)
    assert len(forwards) == 1
    assert len(calls) == 1 + view.global_dim + view.local_dim  # gradient + p + k


def test_create_graph_gives_derivatives_of_the_hessian():
    """Third derivatives: d/dθ of a functional of H equals finite differences."""
    view = view_of("logistic_long")
    theta0, y = random_point(view)
    W = torch.randn(view.num_units, view.local_dim, view.local_dim)

    def functional(theta):
        H = structured_hessian(view, theta, y, create_graph=True)
        return (W * H.D).sum() + H.A.sum() + H.B.square().sum()

    theta = theta0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(functional(theta), theta)
    torch.testing.assert_close(grad, central_gradient(functional, theta0), rtol=1e-7, atol=1e-8)


def test_partial_hessian_with_total_derivative_through_history():
    """With y = f(θ) passed in attached, H is the partial Hessian at (θ, f(θ))
    and backward gives the total derivative d/dθ H(θ, f(θ))."""
    view = view_of("logistic_long")
    theta0, y0 = random_point(view)
    M = torch.randn(view.local_dim, view.global_dim)

    def mode_like(theta):  # any smooth map θ -> y
        return y0 + torch.tanh(theta @ M.T)

    def total(theta):
        H = structured_hessian(view, theta, mode_like(theta), create_graph=True)
        return H.D.sum() + H.B.sum()

    theta = theta0.clone().requires_grad_()
    y = mode_like(theta)
    H = structured_hessian(view, theta, y, create_graph=True)
    # the value is the partial Hessian at the point ...
    torch.testing.assert_close(H.to_dense().detach(), dense_hessian(view, theta.detach(), y.detach()))
    # ... and its derivative runs through y's history
    (grad,) = torch.autograd.grad(H.D.sum() + H.B.sum(), theta)
    torch.testing.assert_close(grad, central_gradient(total, theta0), rtol=1e-7, atol=1e-8)


def test_precision_is_the_negative_hessian():
    view = view_of("gaussian")
    H = structured_hessian(view, view.init_theta, view.init_y)
    P = H.precision()
    torch.testing.assert_close(P.to_dense(), -H.to_dense())


def test_gaussian_hessian_is_the_closed_form():
    """Quadratic log density: H is known exactly (prior 2, unit sd 0.7, noise 0.5)."""
    view = view_of("gaussian")
    H = structured_hessian(view, *random_point(view))
    n_obs = 3
    torch.testing.assert_close(H.A, torch.tensor([[-1 / 4 - view.num_units / 0.49]]))
    torch.testing.assert_close(H.B, torch.full((view.num_units, 1, 1), 1 / 0.49))
    torch.testing.assert_close(H.D, torch.full((view.num_units, 1, 1), -1 / 0.49 - n_obs / 0.25))


def test_non_finite_point_names_the_site():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("wall", torch.where(mu > 3.0, -float("inf"), 0.0))
        with pyro.plate("groups", 3):
            pyro.sample("u", dist.Normal(mu, 1.0))

    view = ModelView(model, unit_plate="groups")
    with pytest.raises(ValueError, match="'wall'"):
        structured_hessian(view, torch.tensor([4.0]), torch.zeros(3, 1))
