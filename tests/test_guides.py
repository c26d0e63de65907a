import pyro
import pyro.distributions as dist
import pytest
import torch
from models import make_linear_gaussian, make_logistic_long, make_poisson_vector
from pyro.infer import SVI, Predictive, Trace_ELBO

import curvi.guides
from curvi.guides import AmortizedLaplaceGuide, LaplaceGuide
from curvi.modes import ModeConvergenceWarning

GUIDES = [LaplaceGuide, AmortizedLaplaceGuide]


def unconstrained_params(guide):
    return {name: p for name, p in guide.named_parameters()}


def elbo(model, guide, args, seed, **elbo_kwargs):
    pyro.set_rng_seed(seed)
    return -Trace_ELBO(**elbo_kwargs).differentiable_loss(model, guide, *args)


def fd_gradient(model, guide, args, seed, param, eps=1e-5):
    grad = torch.zeros_like(param)
    flat, out = param.data.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        up = elbo(model, guide, args, seed).item()
        flat[i] = old - eps
        down = elbo(model, guide, args, seed).item()
        flat[i] = old
        out[i] = (up - down) / (2 * eps)
    return grad


def perturbed_guide(Guide, model, args, seed=0):
    """A guide a little away from its initial point, so gradients are not tiny."""
    guide = Guide(model, unit_plate="groups", init_to_mode=False)
    guide(*args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return guide


@pytest.mark.parametrize("Guide", GUIDES)
@pytest.mark.parametrize(
    "make", [make_logistic_long, make_poisson_vector], ids=["logistic", "poisson_vector"]
)
def test_elbo_gradient_matches_finite_differences(Guide, make):
    model, args, _ = make()
    guide = perturbed_guide(Guide, model, args)
    for seed in (1, 2):
        params = unconstrained_params(guide)
        grads = torch.autograd.grad(elbo(model, guide, args, seed), list(params.values()))
        for (name, p), g in zip(params.items(), grads):
            fd = fd_gradient(model, guide, args, seed, p)
            scale = fd.abs().max()
            assert scale > 1e-3, name
            torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-5 * scale, msg=name)


class DetachedModes(AmortizedLaplaceGuide):
    """The trap: ŷ(θ̂) used as a constant."""

    def _locs(self, view, units):
        theta, y = super()._locs(view, units)
        return theta, y.detach()


def test_detaching_the_modes_gives_the_wrong_gradient():
    model, args, _ = make_logistic_long()
    right, wrong = (
        perturbed_guide(AmortizedLaplaceGuide, model, args),
        perturbed_guide(DetachedModes, model, args),
    )
    with torch.no_grad():
        wrong.loc_global_unconstrained.copy_(right.loc_global_unconstrained)
    fd = fd_gradient(model, right, args, 3, right.loc_global_unconstrained)
    (g_right,) = torch.autograd.grad(elbo(model, right, args, 3), right.loc_global_unconstrained)
    (g_wrong,) = torch.autograd.grad(elbo(model, wrong, args, 3), wrong.loc_global_unconstrained)
    torch.testing.assert_close(elbo(model, wrong, args, 3), elbo(model, right, args, 3))  # same value
    torch.testing.assert_close(g_right, fd, rtol=1e-5, atol=1e-6)
    assert (g_wrong - fd).abs().max() > 1e-2 * fd.abs().max()


# ------------------------------------------------------ exact on a Gaussian
def set_to_exact_mean(guide, exact, args):
    guide(*args)
    with torch.no_grad():
        guide.loc_global_unconstrained.copy_(exact["mean"][:2])
        if isinstance(guide, LaplaceGuide):
            guide.loc_local_unconstrained.copy_(exact["mean"][2:].unsqueeze(-1))


@pytest.mark.parametrize("Guide", GUIDES)
def test_linear_gaussian_guide_is_the_exact_posterior(Guide):
    model, args, plate, exact = make_linear_gaussian()
    guide = Guide(model, unit_plate=plate)
    set_to_exact_mean(guide, exact, args)
    post = guide.laplace_posterior(*args)
    mean = torch.cat([post.loc_theta, post.loc_y.reshape(-1)])
    torch.testing.assert_close(mean, exact["mean"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.precision.to_dense(), exact["precision"], rtol=1e-10, atol=1e-10)
    cov = torch.linalg.inv(exact["precision"])
    torch.testing.assert_close(post.global_covariance(), cov[:2, :2], rtol=1e-10, atol=1e-12)
    # every draw's ELBO estimate is the log evidence ...
    for seed in range(3):
        torch.testing.assert_close(
            elbo(model, guide, args, seed), exact["log_evidence"], rtol=1e-10, atol=1e-9
        )
    # ... and the gradient vanishes in expectation (a single draw's is -P delta)
    grads = []
    for seed in range(40):
        value = elbo(model, guide, args, seed, num_particles=25, vectorize_particles=True)
        torch.testing.assert_close(value, exact["log_evidence"], rtol=1e-10, atol=1e-9)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(guide.parameters()))]))
    grads = torch.stack(grads)
    assert (grads.mean(0).abs() < 4 * grads.std(0) / len(grads) ** 0.5 + 1e-12).all()


@pytest.mark.parametrize("Guide", GUIDES)
def test_training_reaches_the_exact_posterior(Guide):
    model, args, plate, exact = make_linear_gaussian()
    guide = Guide(model, unit_plate=plate, init_to_mode=False)  # really train
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=32, vectorize_particles=True))
    for _ in range(300):
        svi.step(*args)
    median = guide.median(*args)
    found = torch.cat([median["mu"].reshape(1), median["b"].reshape(1), median["u"].reshape(-1)])
    sd = torch.linalg.inv(exact["precision"]).diagonal().sqrt()
    assert ((found - exact["mean"]).abs() < 0.1 * sd).all()


@pytest.mark.parametrize("Guide", GUIDES)
def test_quantiles_are_the_exact_marginals(Guide):
    model, args, plate, exact = make_linear_gaussian()
    guide = Guide(model, unit_plate=plate)
    set_to_exact_mean(guide, exact, args)
    q = guide.quantiles([0.1, 0.5, 0.9], *args)
    sd = torch.linalg.inv(exact["precision"]).diagonal().sqrt()
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.1, 0.5, 0.9]))
    torch.testing.assert_close(q["mu"], exact["mean"][0] + z * sd[0])
    torch.testing.assert_close(q["u"].reshape(3, -1), exact["mean"][2:] + z[:, None] * sd[2:])
    torch.testing.assert_close(q["mu"][1], guide.median(*args)["mu"])


# -------------------------------------------------------- Pyro integration
@pytest.mark.parametrize("Guide", GUIDES)
def test_vectorized_particles_compute_the_hessian_once_per_step(Guide, monkeypatch):
    model, args, _ = make_poisson_vector()
    guide = Guide(model, unit_plate="groups")
    svi = SVI(
        model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(num_particles=8, vectorize_particles=True)
    )
    svi.step(*args)  # set-up (and Pyro's guess of max_plate_nesting)
    calls = []
    real = curvi.guides.structured_hessian
    monkeypatch.setattr(curvi.guides, "structured_hessian", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss = svi.step(*args)
    assert len(calls) == 1 and torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("Guide", GUIDES)
def test_vectorized_particles_estimate_the_same_elbo(Guide):
    model, args, _, _ = make_linear_gaussian()
    guide = perturbed_guide(Guide, model, args)
    one = torch.stack([elbo(model, guide, args, s).detach() for s in range(200)])
    many = elbo(model, guide, args, 0, num_particles=2000, vectorize_particles=True).detach()
    assert abs(one.mean() - many) < 4 * one.std() / 200**0.5 + 1e-3


@pytest.mark.parametrize("Guide", GUIDES)
def test_predictive_draws_every_site(Guide):
    model, args, _ = make_poisson_vector()
    guide = Guide(model, unit_plate="groups")
    guide(*args)
    for parallel in (False, True):
        samples = Predictive(model, guide=guide, num_samples=11, parallel=parallel)(*args)
        assert samples["w"].shape == (11, 5, 1, 3) and samples["c"].shape == (11, 5, 4)
        assert samples["tau"].shape == (11, 1, 1, 3) and (samples["tau"] > 0).all()


@pytest.mark.parametrize("Guide", GUIDES)
def test_first_call_under_no_grad(Guide):
    """The set-up (mode solve) and the Hessian need autograd: a first call
    under torch.no_grad must still work, and draw the same values as with grad."""
    model, args, _ = make_poisson_vector()
    draws = []
    for grad in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        guide = Guide(model, unit_plate="groups")
        with torch.set_grad_enabled(grad):
            draws.append(guide(*args))
    for name, value in draws[0].items():
        assert not value.requires_grad
        assert torch.allclose(value, draws[1][name].detach(), atol=1e-10), name


@pytest.mark.parametrize("Guide", GUIDES)
def test_subsampled_unit_plate(Guide):
    model, args, plate, exact = make_linear_gaussian(num_groups=12, subsample_size=4)
    guide = Guide(model, unit_plate=plate)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(*args)
    if isinstance(guide, LaplaceGuide):
        assert guide.loc_local.shape == (12, 1)  # sized by the full plate
    else:
        assert guide.mode_cache.shape == (12, 1)
    assert guide.median(*args)["u"].shape == (12, 1)


@pytest.mark.parametrize("Guide", GUIDES)
def test_subsampled_elbo_is_unbiased(Guide):
    """At the exact posterior the full-batch ELBO estimate is log Z for every
    draw; with 4 of 12 units per step its average must be log Z too."""
    model, args, plate, exact = make_linear_gaussian(num_groups=12, subsample_size=4)
    guide = Guide(model, unit_plate=plate)
    set_to_exact_mean(guide, exact, args)
    guide.running_schur = guide.laplace_posterior(*args).precision.schur  # the exact S
    guide.running_count.fill_(1)
    # each call: one subsample of units, the mean of 50 draws for it
    values = torch.stack(
        [elbo(model, guide, args, s, num_particles=50, vectorize_particles=True).detach() for s in range(400)]
    )
    se = values.std() / len(values) ** 0.5
    assert values.std() > 0.1  # subsampling noise is there ...
    assert abs(values.mean() - exact["log_evidence"]) < 4 * se  # ... and averages out


def test_mode_fn_closed_form():
    model, args, plate, exact = make_linear_gaussian()
    x, obs = args

    def modes(theta, x, obs):  # E[u | mu, b, z] for the Gaussian model
        mu, b = theta
        prec = 1 / 0.8**2 + obs.shape[1] / 0.6**2
        return ((mu / 0.8**2 + (obs - b * x).sum(1) / 0.6**2) / prec).unsqueeze(-1)

    guide = AmortizedLaplaceGuide(model, unit_plate=plate, mode_fn=modes)
    set_to_exact_mean(guide, exact, args)
    torch.testing.assert_close(elbo(model, guide, args, 0), exact["log_evidence"])
    bad = AmortizedLaplaceGuide(model, unit_plate=plate, mode_fn=lambda theta, *a: torch.zeros(3))
    with pytest.raises(ValueError, match=r"mode_fn must return a tensor of shape \(5, 1\)"):
        bad(*args)


def test_unconverged_modes_are_reported():
    model, args, _ = make_poisson_vector()
    guide = AmortizedLaplaceGuide(model, unit_plate="groups", max_iter=1)
    with pytest.warns(ModeConvergenceWarning, match="units did not reach"):
        guide(*args)
        with torch.no_grad():
            guide.loc_global_unconstrained.add_(2.0)
        guide(*args)


def test_bad_arguments():
    model, args, _ = make_poisson_vector()
    with pytest.raises(ValueError, match="unit_plate"):
        LaplaceGuide(model, unit_plate=3)
    with pytest.raises(ValueError, match="repair=None"):
        LaplaceGuide(model, unit_plate="groups", repair=None)
    with pytest.raises(ValueError, match="unknown repair"):
        LaplaceGuide(model, unit_plate="groups", repair="abs")
    with pytest.raises(ValueError, match="no plate named"):
        LaplaceGuide(model, unit_plate="herds")(*args)

    def no_globals():
        with pyro.plate("groups", 3):
            pyro.sample("u", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="at least one global"):
        AmortizedLaplaceGuide(no_globals, unit_plate="groups")()


@pytest.mark.parametrize("optimiser, subsample_size", [("adam", None), ("adam", 3), ("laplace_newton", None)])
def test_fit_resumes_the_amortized_guide_exactly(tmp_path, subsample_size, optimiser):
    """The mode cache and the running Schur average are buffers, and
    LaplaceNewton's state is optimiser state: a resumed fit continues
    bitwise (LaplaceNewton refuses subsampled plates)."""
    from curvi import LaplaceNewton, fit

    model, args, plate, _ = make_linear_gaussian(subsample_size=subsample_size)

    def run(steps, checkpoint):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AmortizedLaplaceGuide(model, unit_plate=plate)
        result = fit(
            model,
            guide,
            *args,
            steps=steps,
            checkpoint=checkpoint,
            tol=None,
            progress=False,
            optim=(
                pyro.optim.Adam({"lr": 0.05})
                if optimiser == "adam"
                else LaplaceNewton(num_particles=2, blocks=2)
            ),
        )
        return result, guide

    straight, guide_a = run(12, None)
    run(5, tmp_path / "fit.pt")
    resumed, guide_b = run(12, tmp_path / "fit.pt")
    assert resumed.elbo == straight.elbo
    assert torch.equal(guide_a.loc_global, guide_b.loc_global)
    assert torch.equal(guide_a.mode_cache, guide_b.mode_cache)
    assert torch.equal(guide_a.running_schur, guide_b.running_schur)


@pytest.mark.parametrize("Guide", GUIDES)
def test_guides_start_at_the_laplace_mode(Guide):
    """For a Gaussian model the Laplace mode is the exact posterior mean."""
    model, args, plate, exact = make_linear_gaussian()
    guide = Guide(model, unit_plate=plate)
    guide(*args)
    torch.testing.assert_close(guide.loc_global, exact["mean"][:2], rtol=1e-8, atol=1e-8)


# ------------------------------------------------------- marginal curvature
def test_marginal_global_precision_is_the_laplace_marginal_curvature():
    from curvi.marginal import laplace_hessian

    model, args, _ = make_poisson_vector()
    guide = AmortizedLaplaceGuide(model, unit_plate="groups", global_precision="marginal")
    trace = pyro.poutine.trace(guide).get_trace(*args)
    q = curvi.guides.laplace_gaussian(trace)
    theta = guide.loc_global.detach()
    expected = -laplace_hessian(guide.view, theta, guide.mode_cache)
    torch.testing.assert_close(q.global_precision, expected, rtol=1e-6, atol=1e-6)
    # the site q(θ) samples from is that Gaussian's marginal
    q_theta = trace.nodes[f"_{guide._pyro_name}_global"]["fn"]
    torch.testing.assert_close(q_theta.precision_matrix, expected, rtol=1e-6, atol=1e-6)
    cov = guide.laplace_posterior(*args).global_covariance()
    torch.testing.assert_close(cov, torch.linalg.inv(expected), rtol=1e-6, atol=1e-8)


def test_marginal_global_precision_gradient_matches_finite_differences():
    """With the marginal curvature held (as LaplaceNewton holds it within a
    block) the ELBO is a smooth function of θ̂ with an exact autograd
    gradient; outside a hold the curvature is recomputed at each new θ̂, so
    q(θ) is a function of θ̂ alone."""
    model, args, _ = make_logistic_long()
    guide = AmortizedLaplaceGuide(model, unit_plate="groups", global_precision="marginal", init_to_mode=False)
    guide(*args)
    with torch.no_grad():
        guide.loc_global_unconstrained.add_(0.1)
    elbo(model, guide, args, 0)  # recomputed at the new point
    count = guide.marginal_count.item()
    param = guide.loc_global_unconstrained
    with guide.holding_global_precision():
        (grad,) = torch.autograd.grad(elbo(model, guide, args, 4), param)
        torch.testing.assert_close(grad, fd_gradient(model, guide, args, 4, param), rtol=1e-5, atol=1e-6)
    assert guide.marginal_count.item() == count  # held: never recomputed
    theta = param.detach().clone()
    with torch.no_grad():
        param.add_(1e-3)
    elbo(model, guide, args, 0)
    assert guide.marginal_count.item() == count + 1  # a new θ̂: recomputed
    with torch.no_grad():
        param.copy_(theta)
    first = elbo(model, guide, args, 4)
    assert guide.marginal_count.item() == count + 2
    assert elbo(model, guide, args, 4) == first  # the same θ̂: the same q, no recomputation
    assert guide.marginal_count.item() == count + 2


def test_marginal_global_precision_is_refused_under_subsampling():
    model, args, plate, _ = make_linear_gaussian(num_groups=12, subsample_size=4)
    guide = AmortizedLaplaceGuide(model, unit_plate=plate, global_precision="marginal")
    with pytest.raises(ValueError, match="not available when plate 'groups' subsamples"):
        guide(*args)
    with pytest.raises(ValueError, match="'joint' or 'marginal'"):
        AmortizedLaplaceGuide(model, unit_plate=plate, global_precision="exact")


@pytest.mark.parametrize("Guide", GUIDES)
def test_stale_parameter_of_another_model_is_an_error(Guide):
    """Pyro's param store keeps parameters by name: a new guide of the same
    class on another model must not pick up the old one's loc_global."""
    model, args, _ = make_poisson_vector()
    pyro.clear_param_store()
    Guide(model, unit_plate="groups")(*args)
    other, other_args, plate, _ = make_linear_gaussian()
    with pytest.raises(ValueError, match="clear_param_store"):
        Guide(other, unit_plate=plate)(*other_args)
    pyro.clear_param_store()
    Guide(other, unit_plate=plate)(*other_args)


@pytest.mark.parametrize("Guide", GUIDES)
def test_to_dtype_moves_the_model_view_with_the_parameters(Guide):
    """``guide.to(dtype)`` converts the view's tensors too: on a subsampled
    model ``median`` writes batches into the view's dtype, and failed with
    "Index put requires the source and destination dtypes match"."""
    model, args, plate, _ = make_linear_gaussian(num_groups=12, subsample_size=4)
    guide = Guide(model, unit_plate=plate)
    guide(*args)
    assert guide.to(torch.float32) is guide
    assert guide.view.init_y.dtype == guide.view.init_theta.dtype == torch.float32
    cast = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    median = guide.median(*cast)
    assert all(v.dtype == torch.float32 for v in median.values())
    guide.to(torch.float64)
    assert guide.view.init_y.dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in guide.median(*args).values())


def test_laplace_guide_refuses_data_with_other_units():
    """LaplaceGuide returned the fitted units' means for data with other
    units; its per-unit parameters cannot describe other units, and it says so."""
    model, args, plate = make_poisson_vector()
    guide = LaplaceGuide(model, unit_plate=plate)
    guide(*args)
    X, counts = args
    more = (torch.cat([X, X[:2]]), torch.cat([counts, counts[:2]]))
    message = f"set up for {X.shape[0]} units .* these data have {X.shape[0] + 2}"
    for call in (
        lambda: guide(*more),
        lambda: guide.median(*more),
        lambda: guide.quantiles([0.5], *more),
        lambda: Predictive(model, guide=guide, num_samples=2)(*more),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    guide.median(*args)  # the same units: fine


def test_amortized_guide_reads_out_data_with_other_units():
    """On data with new units the amortized guide keeps the fitted q(θ) and
    solves each new unit's mode and q(yᵢ | θ) from its data: the fitted units
    read out as before, and guide calls and Predictive draw the new units."""
    model, args, plate = make_poisson_vector(num_groups=6)
    X, counts = args
    g = torch.Generator().manual_seed(7)
    more = (torch.cat([X, torch.randn(3, *X.shape[1:], generator=g)]), torch.cat([counts, counts[:3] + 1]))
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(3):
        svi.step(*args)
    fitted_q = guide.quantiles([0.1, 0.5, 0.9], *args)
    fitted_posterior = guide.laplace_posterior(*args)
    # read-outs on 9 units: the first 6 are the fitted ones
    q = guide.quantiles([0.1, 0.5, 0.9], *more)
    assert q["w"].shape == (3, 9, 1, 3)
    torch.testing.assert_close(q["w"][:, :6], fitted_q["w"])
    torch.testing.assert_close(q["mu"], fitted_q["mu"])
    torch.testing.assert_close(
        guide.laplace_posterior(*more).global_covariance(), fitted_posterior.global_covariance()
    )
    torch.testing.assert_close(guide.median(*more)["w"][:6], guide.median(*args)["w"])
    # draws of the new units' latents, one call or Predictive (parallel or not)
    assert guide(*more)["w"].shape == (9, 1, 3)
    for parallel in (False, True):
        draws = Predictive(model, guide=guide, num_samples=4, parallel=parallel)(*more)
        assert draws["w"].shape == (4, 9, 1, 3) and draws["c"].shape == (4, 9, 4)
    # the fitted data are untouched: training goes on as before
    torch.testing.assert_close(guide.quantiles([0.1, 0.5, 0.9], *args)["w"], fitted_q["w"])
    svi.step(*args)
