import pyro
import pyro.distributions as dist
import pytest
import torch
from models import MODELS, make_gaussian, make_logistic_long, make_poisson_vector
from pyro.infer.mcmc.util import initialize_model

from curvi import ModelView

EXPECTED_LAYOUT = {  # globals, locals, p, k, N
    "logistic_long": (("beta", "sigma"), ("u",), 4, 2, 7),
    "poisson_vector": (("mu", "tau"), ("w",), 4, 3, 5),
    "lkj": (("L", "sigma", "mu"), ("u", "s"), 4, 3, 6),
    "nested_latent": (("mu", "tau"), ("a", "b"), 2, 4, 4),
    "gaussian": (("mu",), ("u",), 1, 1, 6),
}


def random_point(view, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    theta = view.init_theta + scale * torch.randn(view.global_dim, generator=g)
    y = view.init_y + scale * torch.randn(view.init_y.shape, generator=g)
    return theta, y


@pytest.mark.parametrize("name", MODELS)
def test_layout(name):
    model, args, plate = MODELS[name]()
    view = ModelView(model, *args, unit_plate=plate)
    globals_, locals_, p, k, n = EXPECTED_LAYOUT[name]
    assert view.global_sites == globals_
    assert view.local_sites == locals_
    assert (view.global_dim, view.local_dim, view.num_units) == (p, k, n)
    assert view.init_theta.shape == (p,) and view.init_y.shape == (n, k)
    assert len(view.global_coordinate_names()) == p
    assert len(view.local_coordinate_names()) == k


@pytest.mark.parametrize("name", MODELS)
def test_pack_unpack_round_trip(name):
    model, args, plate = MODELS[name]()
    view = ModelView(model, *args, unit_plate=plate)
    theta, y = random_point(view)
    theta2, y2 = view.pack(view.unpack(theta, y))
    torch.testing.assert_close(theta2, theta, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y2, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", MODELS)
def test_log_joint_matches_pyro_potential_energy(name):
    """Pyro's MCMC potential energy is an independent reference for the
    unconstrained log joint (Jacobians included)."""
    model, args, plate = MODELS[name]()
    view = ModelView(model, *args, unit_plate=plate)
    _, potential_fn, transforms, _ = initialize_model(model, args)
    for seed in range(3):
        theta, y = random_point(view, seed)
        values = view.unpack(theta, y)
        params = {n: transforms[n](v) if n in transforms else v for n, v in values.items()}
        expected = -potential_fn(params)
        torch.testing.assert_close(view.log_joint(theta, y), expected, rtol=1e-12, atol=1e-10)


def test_coordinate_order_is_execution_order_row_major():
    model, args, plate = make_poisson_vector()
    view = ModelView(model, *args, unit_plate=plate)
    w = (10.0 * torch.arange(5.0)).reshape(5, 1, 1) + torch.arange(3.0)
    theta, y = view.pack({"mu": torch.tensor(0.5), "tau": torch.tensor([1.0, 2.0, 3.0]), "w": w})
    expected_theta = torch.cat([torch.tensor([0.5]), torch.tensor([1.0, 2.0, 3.0]).log()])
    torch.testing.assert_close(theta, expected_theta)
    torch.testing.assert_close(y, w.reshape(5, 3))


def test_log_joint_works_under_torch_func():
    model, args, plate = make_logistic_long()
    view = ModelView(model, *args, unit_plate=plate)
    theta, y = random_point(view)
    g_func = torch.func.grad(view.log_joint, argnums=(0, 1))(theta, y)
    th, yy = theta.clone().requires_grad_(), y.clone().requires_grad_()
    g_auto = torch.autograd.grad(view.log_joint(th, yy), (th, yy))
    for a, b in zip(g_func, g_auto):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_subsampled_unit_plate_scales_unit_terms():
    obs = torch.randn(10, 3)

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", 10, subsample_size=4, dim=-2) as idx:
            u = pyro.sample("u", dist.LogNormal(mu, tau))
            with pyro.plate("obs", 3, dim=-1):
                pyro.sample("z", dist.Normal(u, 0.5), obs=obs[idx])

    view = ModelView(model, obs, unit_plate="groups")
    assert view.num_units == 10 and view.init_y.shape == (4, 1)
    units = torch.tensor([1, 5, 6, 9])
    theta, y = torch.tensor([0.2, -0.3]), torch.randn(4, 1)
    mu, tau = theta[0], theta[1].exp()
    unit_terms = (
        dist.LogNormal(mu, tau).log_prob(y.exp())
        + y  # log|J| of exp
        + dist.Normal(y.exp(), 0.5).log_prob(obs[units]).sum(-1, keepdim=True)
    ).sum()
    expected = (
        dist.Normal(0.0, 2.0).log_prob(mu)
        + dist.HalfNormal(1.0).log_prob(tau)
        + theta[1]
        + 10 / 4 * unit_terms
    )
    torch.testing.assert_close(view.log_joint(theta, y, units=units), expected)
    with pytest.raises(ValueError, match="units"):
        view.log_joint(theta, torch.randn(5, 1), units=units)


# ------------------------------------------------------------------ errors
def test_unknown_unit_plate_names_the_plates():
    model, args, _ = make_gaussian()
    with pytest.raises(ValueError, match=r"no plate named 'herds'.*\['groups', 'obs'\]"):
        ModelView(model, *args, unit_plate="herds")


def test_unit_plate_without_latents():
    model, args, _ = make_logistic_long()
    with pytest.raises(ValueError, match="'obs' holds no latent"):
        ModelView(model, *args, unit_plate="obs")


def test_discrete_latent_site_is_named():
    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3):
            pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="discrete sample site 'k'"):
        ModelView(model, unit_plate="groups")


def test_latent_in_another_subsampled_plate_is_named():
    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("years", 20, subsample_size=5):
            pyro.sample("v", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3):
            pyro.sample("u", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'v' sits in plate 'years'"):
        ModelView(model, unit_plate="groups")


def test_latent_in_another_full_plate_is_global():
    def model():
        v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
        with pyro.plate("years", 3):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 5):
            pyro.sample("u", dist.Normal(v.sum() + w.sum(), 1.0))

    view = ModelView(model, unit_plate="groups")
    assert view.global_sites == ("v", "w") and view.global_dim == 7


def test_non_finite_log_density_names_the_site():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("wall", torch.where(mu > 3.0, -float("inf"), 0.0))
        with pyro.plate("groups", 3):
            pyro.sample("u", dist.Normal(mu, 1.0))

    view = ModelView(model, unit_plate="groups")
    view.check_finite(torch.tensor([0.0]), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="sites responsible: 'wall' \\(-inf\\)"):
        view.check_finite(torch.tensor([4.0]), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="theta holds non-finite"):
        view.check_finite(torch.tensor([float("nan")]), torch.zeros(3, 1))


def test_nan_at_initial_point_raises_at_set_up():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            pyro.sample("z", dist.Normal(u, torch.tensor(float("nan"))), obs=torch.zeros(3))

    with pytest.raises(ValueError, match="sites responsible: 'z' \\(nan\\)"):
        ModelView(model, unit_plate="groups")


def test_coupled_units_are_detected():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 8):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
        pyro.factor("smooth", -((u[1:] - u[:-1]) ** 2).sum())

    with pytest.raises(ValueError, match="units are coupled"):
        ModelView(model, unit_plate="groups")
    ModelView(model, unit_plate="groups", check_structure=False)  # opt-out


def test_long_format_indexing_passes_the_structure_check():
    model, args, plate = make_logistic_long(num_groups=30)
    view = ModelView(model, *args, unit_plate=plate)
    assert view.num_units == 30


def test_bad_coordinates_are_rejected():
    model, args, plate = make_gaussian()
    view = ModelView(model, *args, unit_plate=plate)
    with pytest.raises(ValueError, match=r"theta must have shape \(1,\)"):
        view.log_joint(torch.zeros(2), view.init_y)
    with pytest.raises(ValueError, match=r"y must have shape \(n, 1\)"):
        view.log_joint(view.init_theta, torch.zeros(6, 2))
    with pytest.raises(ValueError, match="missing \\['u'\\]"):
        view.pack({"mu": torch.tensor(0.0)})


# ------------------------------------------------------------ per-unit terms
@pytest.mark.parametrize("name", [n for n in MODELS if n != "logistic_long"])
def test_unit_log_joint_splits_the_y_dependence(name):
    """log_joint - sum(unit_log_joint) must not depend on y."""
    model, args, plate = MODELS[name]()
    view = ModelView(model, *args, unit_plate=plate)
    assert view.separable
    theta, y = random_point(view)
    rest = view.log_joint(theta, y) - view.unit_log_joint(theta, y).sum()
    y2 = y + torch.randn(y.shape)
    rest2 = view.log_joint(theta, y2) - view.unit_log_joint(theta, y2).sum()
    torch.testing.assert_close(rest, rest2)
    # and each entry moves only with its own unit
    y3 = y.clone()
    y3[1] += 0.3
    changed = view.unit_log_joint(theta, y3) != view.unit_log_joint(theta, y)
    assert changed.tolist() == [i == 1 for i in range(view.num_units)]


def test_long_format_is_split_by_unit_through_its_derivatives():
    """Observations outside the unit plate (u[group]) are not separable by the
    plates, but unit_log_joint finds each observation's unit: moving one
    unit's latents changes that unit's entry only, by the change of log_joint."""
    model, args, plate = make_logistic_long()
    view = ModelView(model, *args, unit_plate=plate)
    assert not view.separable
    theta, y = random_point(view, 0)
    before = view.unit_log_joint(theta, y)
    for unit in range(y.shape[0]):
        moved = y.clone()
        moved[unit] += 0.3
        change = view.unit_log_joint(theta, moved) - before
        assert (change.abs() > 0).nonzero().flatten().tolist() == [unit]
        torch.testing.assert_close(change.sum(), view.log_joint(theta, moved) - view.log_joint(theta, y))


def test_a_term_of_two_units_cannot_be_split():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
        pyro.sample("pair", dist.Normal(u[..., 0] + u[..., 1], 1.0), obs=torch.tensor(0.0))

    view = ModelView(model, unit_plate="groups", check_structure=False)
    with pytest.raises(ValueError, match="more than one unit"):
        view.unit_log_joint(view.init_theta, view.init_y)


@pytest.mark.parametrize("name", MODELS)
def test_unpack_with_leading_batch_dims(name):
    model, args, plate = MODELS[name]()
    view = ModelView(model, *args, unit_plate=plate)
    thetas = torch.stack([random_point(view, s)[0] for s in range(3)])
    ys = torch.stack([random_point(view, s)[1] for s in range(3)])
    batched = view.unpack(thetas, ys)
    for s in range(3):
        single = view.unpack(thetas[s], ys[s])
        for site, value in single.items():
            torch.testing.assert_close(batched[site][s], value)


def test_with_args_rebinds_the_data():
    model, args, plate = make_gaussian()
    view = ModelView(model, *args, unit_plate=plate)
    other = view.with_args(args[0] + 1.0)
    theta, y = view.init_theta, view.init_y
    assert other.global_sites == view.global_sites
    assert not torch.allclose(other.log_joint(theta, y), view.log_joint(theta, y))
    torch.testing.assert_close(
        ModelView(model, args[0] + 1.0, unit_plate=plate).log_joint(theta, y), other.log_joint(theta, y)
    )
