import pyro
import pyro.distributions as dist
import pytest
import torch
from fd import central_gradient
from models import MODELS
from test_model import random_point

from curvi import ModelView
from curvi.hessian import gradient, structured_hessian
from curvi.modes import (
    ModeConvergenceWarning,
    implicit_modes,
    newton_inverse,
    solve_modes,
    warn_unconverged,
)


def view_of(name, **kwargs):
    model, args, plate = MODELS[name](**kwargs)
    return ModelView(model, *args, unit_plate=plate)


@pytest.mark.parametrize("name", MODELS)
def test_modes_zero_the_gradient_and_are_maxima(name):
    view = view_of(name)
    theta, y0 = random_point(view)
    result = solve_modes(view, theta, y0)
    assert result.converged.all()
    y = implicit_modes(view, theta, result)
    _, g_y = gradient(view, theta, y)
    assert g_y.abs().max() < 1e-9
    assert (torch.linalg.eigvalsh(result.precision) > 0).all()


def test_gaussian_modes_are_the_closed_form():
    view = view_of("gaussian")
    obs = view.args[0]
    mu = torch.tensor([0.4])
    result = solve_modes(view, mu, torch.zeros(view.num_units, 1))
    prec = 1 / 0.49 + obs.shape[1] / 0.25
    expected = (mu / 0.49 + obs.sum(1) / 0.25) / prec
    torch.testing.assert_close(result.y.squeeze(-1), expected, rtol=1e-12, atol=1e-12)
    assert result.num_iterations == 1  # quadratic: one Newton step


@pytest.mark.parametrize("name", ["logistic_long", "poisson_vector", "lkj"])
def test_implicit_derivative_matches_finite_differences(name):
    view = view_of(name)
    theta0, y0 = random_point(view)
    weights = torch.randn(y0.shape)

    def objective(theta):
        result = solve_modes(view, theta, y0, xtol=1e-12)
        return (weights * implicit_modes(view, theta, result)).sum()

    theta = theta0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(objective(theta), theta)
    torch.testing.assert_close(grad, central_gradient(objective, theta0), rtol=1e-7, atol=1e-9)


def test_implicit_derivative_is_minus_d_inverse_b():
    view = view_of("poisson_vector")
    theta0, y0 = random_point(view)
    theta = theta0.clone().requires_grad_()
    y = implicit_modes(view, theta, solve_modes(view, theta, y0))
    jac = torch.stack(
        [
            torch.autograd.grad(y[i, j], theta, retain_graph=True)[0]
            for i in range(y.shape[0])
            for j in range(y.shape[1])
        ]
    )
    H = structured_hessian(view, theta0, y.detach())
    expected = -torch.linalg.solve(H.D, H.B)  # (n, k, p): -D^-1 B with Hessian blocks
    torch.testing.assert_close(jac.reshape(expected.shape), expected, rtol=1e-8, atol=1e-10)


def test_far_start_is_rescued_by_the_line_search():
    counts = torch.tensor([0.0, 1.0, 50.0, 3.0])

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 4):
            u = pyro.sample("u", dist.Normal(mu, 2.0))
            pyro.sample("c", dist.Poisson(u.exp()), obs=counts)

    view = ModelView(model, unit_plate="groups")
    result = solve_modes(view, torch.tensor([0.0]), torch.full((4, 1), 8.0))
    assert result.converged.all()
    assert result.y[2, 0] == pytest.approx(torch.log(torch.tensor(50.0)).item(), abs=0.1)


def test_long_format_uses_the_total_line_search_and_converges():
    view = view_of("logistic_long", num_groups=20)
    assert not view.separable
    theta, _ = random_point(view)
    result = solve_modes(view, theta, torch.full((20, 2), 3.0))
    assert result.converged.all()


def test_indefinite_unit_blocks_still_give_ascent_steps():
    """A bimodal unit term: the Hessian block is indefinite between the modes."""

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3):
            u = pyro.sample("u", dist.Normal(mu, 3.0))
            pyro.factor("bimodal", -((u**2 - 1.0) ** 2))

    view = ModelView(model, unit_plate="groups")
    result = solve_modes(view, torch.tensor([0.0]), torch.tensor([[0.05], [-0.2], [2.0]]))
    assert result.converged.all()
    assert (result.y.abs() - 1).abs().max() < 0.05  # near ±1, not stuck at the saddle 0


def test_newton_inverse():
    P = torch.stack([torch.tensor([[2.0, 0.5], [0.5, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, -4.0]])])
    inv = newton_inverse(P)
    torch.testing.assert_close(inv[0], torch.linalg.inv(P[0]))
    torch.testing.assert_close(inv[1], torch.diag(torch.tensor([1.0, 0.25])))


def test_newton_inverse_of_a_singular_block_is_the_floored_one():
    """A coordinate without curvature (a masked latent) makes a block
    singular; its failed Cholesky factor must not reach cholesky_inverse
    (which raised LinAlgError), the eigenvalue fallback inverts it."""
    P = torch.stack([torch.tensor([[2.0, 0.5], [0.5, 1.0]]), torch.tensor([[3.0, 0.0], [0.0, 0.0]])])
    inv = newton_inverse(P)
    torch.testing.assert_close(inv[0], torch.linalg.inv(P[0]))
    floor = torch.finfo(P.dtype).eps ** 0.5 * 3.0
    torch.testing.assert_close(inv[1], torch.diag(torch.tensor([1 / 3.0, 1 / floor])))
    assert torch.isfinite(newton_inverse(torch.zeros(3, 2, 2))).all()


def test_unconverged_units_are_named():
    view = view_of("poisson_vector")
    theta, _ = random_point(view)
    result = solve_modes(view, theta, torch.full((view.num_units, 3), 2.0), max_iter=1)
    assert not result.converged.all()
    with pytest.warns(ModeConvergenceWarning, match=r"of 5 units did not reach .* \(units "):
        warn_unconverged(result)
    with pytest.raises(ValueError, match="max_iter"):
        solve_modes(view, theta, result.y, max_iter=0)


def test_modes_keep_the_coordinates_dtype():
    """float32 latents with float64 data: the density is float64, y stays float32."""
    obs = torch.randn(6, 3, dtype=torch.float64)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float32), 1.0))
        with pyro.plate("groups", 6, dim=-2):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            with pyro.plate("obs", 3, dim=-1):
                pyro.sample("z", dist.Normal(u, 1.0), obs=obs)

    view = ModelView(model, unit_plate="groups")
    assert view.init_y.dtype == torch.float32
    result = solve_modes(view, view.init_theta, view.init_y + 1.0)
    assert result.y.dtype == torch.float32 and result.precision.dtype == torch.float32
