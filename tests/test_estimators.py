"""Gradient estimators: the curvature control variate, sticking the landing,
the leave-one-out baseline, and the diagnostics that show what they do.

Correctness is measured two ways: exactly where the answer is known (a
Gaussian model, where the control variate is exact and its estimate has no
noise; a guide at the exact posterior, where the gradient is zero; discrete
and Beta guides whose ELBO has a closed form), and statistically elsewhere
(the mean over many draws against Pyro's plain estimator, within a few
Monte Carlo standard errors).
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from models import make_linear_gaussian, make_logistic_long
from pyro.distributions.testing.fakes import NonreparameterizedBeta
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from curvi import (
    AmortizedLaplaceGuide,
    LaplaceGuide,
    LeaveOneOut_ELBO,
    TaylorCV_ELBO,
    compare_gradient_variance,
    gradient_variance,
    surrogate_terms,
)
from curvi.arrowhead import arrowhead_to_dense

PYRO_GUIDES = [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal]
LAPLACE_GUIDES = [LaplaceGuide, AmortizedLaplaceGuide]


def make_guide(cls, model, args, plate="groups"):
    guide = cls(model, unit_plate=plate) if cls in LAPLACE_GUIDES else cls(model)
    pyro.set_rng_seed(0)
    guide(*args)
    return guide


def params_of(guide):
    return [p for _, p in sorted(guide.named_parameters())]


def grad_draw(loss, model, guide, args, seed):
    pyro.set_rng_seed(seed)
    params = params_of(guide)
    value = loss.differentiable_loss(model, guide, *args)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def draws(loss, model, guide, args, n, seed=0):
    return torch.stack([grad_draw(loss, model, guide, args, seed + i) for i in range(n)])


# --------------------------------------------------------------------------
# the control variate on a Gaussian model: exact, no noise


@pytest.mark.parametrize("unit_plate", [None, "groups"])
@pytest.mark.parametrize("cls", PYRO_GUIDES)
def test_control_variate_exact_on_gaussian_model_pyro_guides(cls, unit_plate):
    """log p is quadratic: every draw of the estimate is the exact gradient,
    which the closed-form ELBO of the guide gives independently."""
    model, args, _, _ = make_linear_gaussian()
    guide = make_guide(cls, model, args)
    with torch.no_grad():  # move off the initial point so the gradient is not special
        for p in params_of(guide):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = draws(TaylorCV_ELBO(num_particles=2, unit_plate=unit_plate), model, guide, args, 4)
    assert (g - g[0]).abs().max() < 1e-10
    exact = torch.autograd.grad(-closed_form_elbo(model, guide, args), params_of(guide), allow_unused=True)
    exact = torch.cat(
        [(e if e is not None else torch.zeros_like(p)).reshape(-1) for e, p in zip(exact, params_of(guide))]
    )
    assert torch.allclose(g[0], exact, atol=1e-9, rtol=1e-9)


def closed_form_elbo(model, guide, args):
    """E_q log p + H[q] for a Gaussian guide over the latent vector of Pyro's
    own packing, with log p quadratic: log p(μ) + ½ tr(H Σ) + H[q]."""
    q = (
        guide.get_posterior()
        if hasattr(guide, "get_posterior") and not isinstance(guide, AutoNormal)
        else None
    )
    if q is None:  # AutoNormal: a diagonal Gaussian, site by site
        locs, scales = zip(
            *(guide._get_loc_and_scale(n) for n, _ in guide.prototype_trace.iter_stochastic_nodes())
        )
        loc = torch.cat([t.reshape(-1) for t in locs])
        cov = torch.diag(torch.cat([t.reshape(-1) for t in scales]) ** 2)
        entropy = dist.Normal(loc, cov.diagonal().sqrt()).entropy().sum()
        names = [(n, t.shape) for (n, _), t in zip(guide.prototype_trace.iter_stochastic_nodes(), locs)]
    else:
        loc, entropy = q.mean, q.entropy()
        cov = q.covariance_matrix if hasattr(q, "covariance_matrix") else torch.diag(q.variance)
        names = None

    def log_p(x):
        if names is None:
            values = {site["name"]: v for site, v in guide._unpack_latent(x)}
        else:
            values, offset = {}, 0
            for n, shape in names:
                values[n] = x[offset : offset + shape.numel()].reshape(shape)
                offset += shape.numel()
        constrained, log_jac = {}, 0.0
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            t = torch.distributions.biject_to(site["fn"].support)
            constrained[name] = t(values[name])
            log_jac = log_jac + t.log_abs_det_jacobian(values[name], constrained[name]).sum()
        tr = poutine.trace(poutine.condition(model, constrained)).get_trace(*args)
        return tr.log_prob_sum() + log_jac

    H = torch.autograd.functional.hessian(log_p, loc.detach())
    return log_p(loc) + 0.5 * (H * cov).sum() + entropy


@pytest.mark.parametrize("cls", LAPLACE_GUIDES)
def test_control_variate_exact_on_gaussian_model_laplace_guides(cls):
    """Laplace guides moved off the optimum: the estimate has no noise and
    equals the mean of many plain draws (Pyro's Trace_ELBO)."""
    model, args, plate, _ = make_linear_gaussian()
    guide = make_guide(cls, model, args)
    with torch.no_grad():
        guide.loc_global.add_(torch.tensor([0.3, -0.2]))
    g = draws(TaylorCV_ELBO(num_particles=2, unit_plate=plate), model, guide, args, 3)
    assert (g - g[0]).abs().max() < 1e-9
    plain = draws(Trace_ELBO(num_particles=500, vectorize_particles=True), model, guide, args, 20)
    se = plain.std(0) / math.sqrt(plain.shape[0])
    assert ((g[0] - plain.mean(0)).abs() <= 4 * se + 1e-8).all()


@pytest.mark.parametrize("stl", [False, True])
@pytest.mark.parametrize("cls", LAPLACE_GUIDES + [AutoMultivariateNormal])
def test_gradient_zero_at_exact_posterior(cls, stl):
    """A guide at the exact posterior of a Gaussian model: the ELBO is at its
    maximum, and both the control variate and sticking the landing give a
    gradient that is zero on every draw (the plain estimate is not)."""
    model, args, plate, exact = make_linear_gaussian()
    guide = make_guide(cls, model, args)
    with torch.no_grad():
        if cls is AutoMultivariateNormal:
            perm = latent_order(guide, ["mu", "b", "u"])
            guide.loc.copy_(exact["mean"][perm])
            cov = torch.linalg.inv(exact["precision"])[perm][:, perm]
            L = torch.linalg.cholesky(cov)
            guide.scale = L.diagonal()
            guide.scale_tril = L / L.diagonal().unsqueeze(-1)
        else:
            guide.loc_global.copy_(exact["mean"][:2])
            if cls is LaplaceGuide:
                guide.loc_local.copy_(exact["mean"][2:].reshape(-1, 1))
    loss = TaylorCV_ELBO(num_particles=3, unit_plate=plate, control_variate=not stl, stick_the_landing=stl)
    g = draws(loss, model, guide, args, 3)
    assert g.abs().max() < 1e-8
    plain = draws(Trace_ELBO(num_particles=3, vectorize_particles=True), model, guide, args, 3)
    assert plain.abs().max() > 1e-2


def latent_order(guide, names):
    """Indices into the exact posterior's (mu, b, u) of the guide's latent vector."""
    sizes = {"mu": 1, "b": 1}
    offsets = {"mu": 0, "b": 1, "u": 2}
    order = []
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        n = site["value"].numel()
        order += list(range(offsets[name], offsets[name] + sizes.get(name, n)))
    return torch.tensor(order)


# --------------------------------------------------------------------------
# unbiasedness where log p is not quadratic


@pytest.mark.parametrize(
    "options",
    [
        dict(control_variate=True),
        dict(control_variate=False, stick_the_landing=True),
        dict(control_variate=True, stick_the_landing=True),
    ],
)
@pytest.mark.parametrize(
    "cls", [AutoNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal, AmortizedLaplaceGuide]
)
def test_unbiased_on_logistic_model(cls, options):
    """The mean of the estimate over many draws equals that of Pyro's plain
    reparameterised estimator within Monte Carlo error."""
    model, args, plate = make_logistic_long(num_groups=5)
    guide = make_guide(cls, model, args)
    curved = draws(TaylorCV_ELBO(num_particles=20, unit_plate=plate, **options), model, guide, args, 40)
    plain = draws(Trace_ELBO(num_particles=200, vectorize_particles=True), model, guide, args, 40, seed=1000)
    se = (curved.var(0) / curved.shape[0] + plain.var(0) / plain.shape[0]).sqrt()
    z = (curved.mean(0) - plain.mean(0)).abs() / (se + 1e-12)
    assert z.max() < 4.5, z


def test_control_variate_cuts_variance_near_the_mode():
    """Near a near-Gaussian posterior the control variate removes most of the
    noise (the benchmark measures how much on real data)."""
    model, args, plate = make_logistic_long(num_groups=5)
    guide = make_guide(AutoMultivariateNormal, model, args)
    losses = {"plain": Trace_ELBO(), "cv": TaylorCV_ELBO(unit_plate=plate)}
    plain = gradient_variance(model, guide, losses["plain"], *args, num_draws=30)
    cv = gradient_variance(model, guide, losses["cv"], *args, num_draws=30)
    assert cv.total_variance < plain.total_variance / 5
    table = compare_gradient_variance(model, guide, losses, *args, num_draws=5)
    assert "| cv |" in table and "| plain |" in table


def test_state_of_guides_untouched_by_gradient_variance():
    model, args, plate = make_logistic_long(num_groups=5)
    guide = make_guide(AutoNormal, model, args)
    before = [p.detach().clone() for p in params_of(guide)]
    result = gradient_variance(model, guide, Trace_ELBO(), *args, num_draws=4)
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(guide)))
    assert all(p.grad is None for p in params_of(guide))
    assert set(result.params) == {n for n, _ in pyro.get_param_store().named_parameters()}
    assert "total" in str(result)


# --------------------------------------------------------------------------
# leave-one-out baseline


def coin():
    flips = torch.tensor([1.0] * 6 + [0.0] * 4)

    def model(flips):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        with pyro.plate("flips", len(flips)):
            pyro.sample("obs", dist.Bernoulli(f), obs=flips)

    def guide(flips):
        a = pyro.param("a", torch.tensor(15.0), constraint=dist.constraints.positive)
        b = pyro.param("b", torch.tensor(15.0), constraint=dist.constraints.positive)
        pyro.sample("f", NonreparameterizedBeta(a, b))

    def exact_elbo():
        a, b = pyro.param("a"), pyro.param("b")
        q = dist.Beta(a, b)
        e_log_f = torch.digamma(a) - torch.digamma(a + b)
        e_log_1mf = torch.digamma(b) - torch.digamma(a + b)
        log_norm = torch.lgamma(torch.tensor(10.0)) * 2 - torch.lgamma(torch.tensor(20.0))
        return 15 * e_log_f + 13 * e_log_1mf + log_norm + q.entropy()

    return model, guide, (flips,), exact_elbo


def test_leave_one_out_unbiased_and_less_noisy_on_coin():
    model, guide, args, exact_elbo = coin()
    guide(*args)
    params = [pyro.param("a").unconstrained(), pyro.param("b").unconstrained()]
    exact = torch.stack(torch.autograd.grad(-exact_elbo(), params))
    loo = draws_params(LeaveOneOut_ELBO(num_particles=8), model, guide, args, params, 400)
    plain = draws_params(
        TraceGraph_ELBO(num_particles=8, vectorize_particles=True), model, guide, args, params, 400
    )
    for g in (loo, plain):
        se = g.std(0) / math.sqrt(g.shape[0])
        assert ((g.mean(0) - exact).abs() < 4 * se).all(), (g.mean(0), exact, se)
    assert (loo.var(0) < plain.var(0) / 5).all()


def draws_params(loss, model, guide, args, params, n):
    out = []
    for i in range(n):
        pyro.set_rng_seed(i)
        if isinstance(loss, LeaveOneOut_ELBO):
            value = loss.differentiable_loss(model, guide, *args)
        else:
            value = loss._loss_and_surrogate_loss(model, guide, args, {})[1]
        out.append(torch.stack(torch.autograd.grad(value, params)))
    return torch.stack(out)


def test_leave_one_out_discrete_latent_exact():
    """A Bernoulli latent in the guide (score function) next to a
    reparameterised Normal: the mean estimate equals the gradient of the ELBO
    computed by summing over the discrete latent."""
    data = torch.tensor([0.8, 1.3, -0.2])

    def model(data):
        z = pyro.sample("z", dist.Bernoulli(0.4))
        loc = pyro.sample("loc", dist.Normal(2.0 * z - 1.0, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=data)

    def guide(data):
        p = pyro.param("p", torch.tensor(0.3), constraint=dist.constraints.unit_interval)
        m = pyro.param("m", torch.tensor([0.1, 0.4]))
        z = pyro.sample("z", dist.Bernoulli(p))
        pyro.sample("loc", dist.Normal(m[z.long()], 0.5))

    def exact_elbo():
        p, m = pyro.param("p"), pyro.param("m")
        total = 0.0
        for z, qz in ((0, 1 - p), (1, p)):
            # E_{loc ~ N(m_z, 0.5²)} of log p(loc | z) + Σ log p(x | loc) − log q(loc | z): closed form
            mean, var = m[z], 0.25
            prior = 2.0 * z - 1.0
            e_prior = -0.5 * math.log(2 * math.pi) - 0.5 * ((mean - prior) ** 2 + var)
            e_lik = sum(-0.5 * math.log(2 * math.pi) - 0.5 * ((mean - x) ** 2 + var) for x in data)
            entropy_loc = 0.5 * math.log(2 * math.pi * math.e * var)
            log_pz = math.log(0.4) if z else math.log(0.6)
            total = total + qz * (log_pz - torch.log(qz) + e_prior + e_lik + entropy_loc)
        return total

    guide(data)
    params = [pyro.param("p").unconstrained(), pyro.param("m").unconstrained()]
    exact = torch.autograd.grad(-exact_elbo(), params)
    exact = torch.cat([e.reshape(-1) for e in exact])
    loss = LeaveOneOut_ELBO(num_particles=16, max_plate_nesting=1)
    g = []
    for i in range(300):
        pyro.set_rng_seed(i)
        grads = torch.autograd.grad(loss.differentiable_loss(model, guide, data), params)
        g.append(torch.cat([t.reshape(-1) for t in grads]))
    g = torch.stack(g)
    se = g.std(0) / math.sqrt(g.shape[0])
    assert ((g.mean(0) - exact).abs() < 4 * se + 1e-6).all(), (g.mean(0), exact, se)


def test_leave_one_out_errors():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        LeaveOneOut_ELBO(num_particles=1)
    with pytest.raises(ValueError, match="vectorize_particles"):
        LeaveOneOut_ELBO(num_particles=4, vectorize_particles=False)
    model, _, args, _ = coin()

    def guide(flips):
        a = pyro.param("a", torch.tensor(15.0), constraint=dist.constraints.positive)
        pyro.sample(
            "f", NonreparameterizedBeta(a, a), infer={"baseline": {"use_decaying_avg_baseline": True}}
        )

    with pytest.raises(ValueError, match="site 'f' asks for a Pyro baseline"):
        LeaveOneOut_ELBO(num_particles=4).differentiable_loss(model, guide, *args)


# --------------------------------------------------------------------------
# the surrogate, term by term


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: Trace_ELBO(num_particles=3, vectorize_particles=True),
        lambda: TraceGraph_ELBO(),
        lambda: LeaveOneOut_ELBO(num_particles=4),
    ],
)
def test_surrogate_terms_sum_to_what_backward_sees_coin(make_loss):
    model, guide, args, _ = coin()
    guide(*args)
    check_terms(
        make_loss(), model, guide, args, [pyro.param("a").unconstrained(), pyro.param("b").unconstrained()]
    )


def test_surrogate_terms_show_pyro_baseline():
    model, _, args, _ = coin()

    def guide(flips):
        a = pyro.param("a", torch.tensor(15.0), constraint=dist.constraints.positive)
        pyro.sample(
            "f", NonreparameterizedBeta(a, a), infer={"baseline": {"use_decaying_avg_baseline": True}}
        )

    guide(*args)
    terms = surrogate_terms(TraceGraph_ELBO(), model, guide, *args)
    assert any("baseline (use_decaying_avg_baseline)" in name for name in terms)


@pytest.mark.parametrize("options", [dict(), dict(stick_the_landing=True)])
def test_surrogate_terms_sum_to_what_backward_sees_taylor(options):
    model, args, plate = make_logistic_long(num_groups=4)
    guide = make_guide(AmortizedLaplaceGuide, model, args)
    loss = TaylorCV_ELBO(num_particles=2, unit_plate=plate, **options)
    terms = check_terms(loss, model, guide, args, params_of(guide))
    assert any(name.startswith("control variate") for name in terms)
    assert any(name.startswith("sticking") for name in terms) == bool(options)


def check_terms(loss, model, guide, args, params):
    surrogate_terms(loss, model, guide, *args)  # the first call guesses max_plate_nesting, drawing numbers
    pyro.set_rng_seed(7)
    terms = surrogate_terms(loss, model, guide, *args)
    from_terms = torch.autograd.grad(-sum(terms.values()), params)
    pyro.set_rng_seed(7)
    if isinstance(loss, TraceGraph_ELBO) and not isinstance(loss, LeaveOneOut_ELBO):
        surrogate = loss._loss_and_surrogate_loss(model, guide, args, {})[1]
    else:
        surrogate = loss.differentiable_loss(model, guide, *args)
    from_loss = torch.autograd.grad(surrogate, params)
    for a, b in zip(from_terms, from_loss):
        assert torch.allclose(a, b, atol=1e-10)
    return terms


# --------------------------------------------------------------------------
# errors and Pyro integration


def test_taylor_errors():
    with pytest.raises(ValueError, match="turn one of them on"):
        TaylorCV_ELBO(control_variate=False)
    model, args, plate = make_logistic_long(num_groups=4)
    guide = AutoDelta(model)
    with pytest.raises(ValueError, match="needs? a Gaussian guide.*AutoDelta"):
        TaylorCV_ELBO().differentiable_loss(model, guide, *args)
    sub_model, sub_args, sub_plate, _ = make_linear_gaussian(subsample_size=2)
    sub_guide = AutoNormal(sub_model)
    with pytest.raises(ValueError, match="plate 'groups' of site 'u' subsamples"):
        TaylorCV_ELBO().differentiable_loss(sub_model, sub_guide, *sub_args)
    with pytest.raises(ValueError, match="unit_plate"):
        TaylorCV_ELBO(unit_plate=3)
    with pytest.raises(TypeError, match="loss_and_grads"):
        gradient_variance(model, guide, object(), *args)
    with pytest.raises(ValueError, match="num_draws"):
        gradient_variance(model, guide, Trace_ELBO(), *args, num_draws=1)
    with pytest.raises(TypeError, match="surrogate_terms knows"):
        surrogate_terms(object(), model, guide, *args)


@pytest.mark.parametrize(
    "loss",
    [
        lambda plate: TaylorCV_ELBO(num_particles=4, unit_plate=plate, stick_the_landing=True),
    ],
)
def test_svi_and_fit_train_with_taylor(loss):
    """The loss drives SVI (here through curvi.fit) to the same optimum as Trace_ELBO."""
    from curvi import fit

    model, args, plate = make_logistic_long(num_groups=5)
    guide = AmortizedLaplaceGuide(model, unit_plate=plate)
    result = fit(
        model, guide, *args, steps=60, loss=loss(plate), optim=pyro.optim.Adam({"lr": 0.02}), progress=False
    )
    assert len(result.elbo) > 0 and all(math.isfinite(v) for v in result.elbo)


# --------------------------------------------------------------------------
# state, scale and guard rails


def test_gradient_variance_leaves_grads_rng_and_buffers_alone():
    import random

    import numpy as np

    model, args, plate = make_logistic_long(num_groups=4)
    guide = make_guide(AmortizedLaplaceGuide, model, args)
    for p in params_of(guide):
        p.grad = torch.full_like(p, 100.0)
    buffers = {n: b.clone() for n, b in guide.named_buffers()}
    with torch.no_grad():
        guide.loc_global.add_(0.2)  # the modes must move for the caches to change
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    result = gradient_variance(model, guide, Trace_ELBO(), *args, num_draws=4)
    assert (random.random(), np.random.rand(), float(torch.rand(()))) == (
        random.seed(5) or random.random(),
        np.random.seed(5) or np.random.rand(),
        float(torch.manual_seed(5) and torch.rand(())),
    )
    assert all(torch.equal(p.grad, torch.full_like(p, 100.0)) for p in params_of(guide))
    assert all(torch.equal(b, buffers[n]) for n, b in guide.named_buffers())
    for p in params_of(guide):
        p.grad = None
    again = gradient_variance(model, guide, Trace_ELBO(), *args, num_draws=4)
    assert result.total_variance == again.total_variance  # the stored grads did not leak in


class ScaledAmortized(AmortizedLaplaceGuide):
    def forward(self, *args, **kwargs):
        with poutine.scale(scale=0.25):
            return super().forward(*args, **kwargs)


def test_laplace_sticking_the_landing_under_scale():
    """Model and guide under ``poutine.scale(0.25)``: the STL term is still
    zero-valued and every draw of the gradient is 0.25 × the unscaled one."""
    model, args, plate = make_logistic_long(num_groups=4)
    scaled_model = poutine.scale(model, scale=0.25)
    guide = make_guide(AmortizedLaplaceGuide, model, args)
    pyro.set_rng_seed(0)
    scaled_guide = ScaledAmortized(model, unit_plate=plate)  # the same q, its sites scaled
    scaled_guide(*args)
    loss = TaylorCV_ELBO(num_particles=2, unit_plate=plate, control_variate=False, stick_the_landing=True)
    loss.surrogate_terms(scaled_model, scaled_guide, *args)  # guesses max_plate_nesting
    pyro.set_rng_seed(0)
    terms = loss.surrogate_terms(scaled_model, scaled_guide, *args)
    stl = next(t for n, t in terms.items() if n.startswith("sticking"))
    assert abs(float(stl.detach())) < 1e-10
    pyro.set_rng_seed(1)
    g_scaled = torch.autograd.grad(
        loss.differentiable_loss(scaled_model, scaled_guide, *args), params_of(scaled_guide)
    )
    pyro.set_rng_seed(1)
    g = torch.autograd.grad(loss.differentiable_loss(model, guide, *args), params_of(guide))
    assert all(torch.allclose(a, 0.25 * b, atol=1e-10) for a, b in zip(g_scaled, g))


def test_guide_keeps_no_graph_after_a_step():
    """The estimator reads the guide's Gaussian from the trace: it sets
    nothing on the guide, and the guide keeps no tensor with a graph."""
    import copy

    model, args, plate = make_logistic_long(num_groups=4)
    guide = make_guide(AmortizedLaplaceGuide, model, args)
    before = set(vars(guide))
    TaylorCV_ELBO(unit_plate=plate, stick_the_landing=True).loss_and_grads(model, guide, *args)
    assert set(vars(guide)) <= before
    tensors = [v for v in vars(guide).values() if torch.is_tensor(v)] + list(guide.buffers())
    assert not any(t.grad_fn is not None for t in tensors)
    copy.deepcopy(guide)


@pytest.mark.parametrize("cls", LAPLACE_GUIDES)
def test_laplace_moments_are_the_published_gaussian(cls):
    """The mean and covariance the control variate uses are those of the
    Gaussian the guide published in the trace, and tr(H Σ) is the dense one."""
    from curvi import ModelView
    from curvi.guide_moments import Curvature, FlatLayout, gaussian_view
    from curvi.guides import laplace_gaussian

    model, args, plate = make_logistic_long(num_groups=4)
    guide = make_guide(cls, model, args)
    trace = poutine.trace(guide).get_trace(*args)
    q = laplace_gaussian(trace)
    layout = FlatLayout.from_view(ModelView(model, *args, unit_plate=plate))
    view = gaussian_view(guide, layout)
    mean, cov = view.moments(trace)
    torch.testing.assert_close(mean, torch.cat([q.theta_hat, q.y_hat.reshape(-1)]), rtol=0, atol=0)
    assert cov.precision is q.precision
    H = Curvature.at(layout, mean)
    dense_H = arrowhead_to_dense(*H.blocks)
    expected = (dense_H * torch.linalg.inv(q.precision.to_dense())).sum()
    torch.testing.assert_close(cov.trace_with(H), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="pass guide_trace"):
        view.moments()


def test_function_guide_and_other_elbos_refused():
    from pyro.infer import TraceMeanField_ELBO

    model, args, plate = make_logistic_long(num_groups=4)

    def guide(*args):
        pass

    with pytest.raises(ValueError, match="Gaussian guide.*got function"):
        TaylorCV_ELBO().differentiable_loss(model, guide, *args)
    with pytest.raises(TypeError, match="surrogate_terms knows"):
        surrogate_terms(TraceMeanField_ELBO(), model, make_guide(AutoNormal, model, args), *args)


def test_data_subsampling_refused():
    obs = torch.randn(40)

    def model(obs):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(obs), subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=obs[idx])

    guide = AutoNormal(model)
    with pytest.raises(ValueError, match="full data: plate 'data' of site 'obs' subsamples"):
        TaylorCV_ELBO().differentiable_loss(model, guide, obs)


@pytest.mark.parametrize("cls", [AutoNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal])
@pytest.mark.parametrize("unit_plate", [None, "groups"])
def test_moments_match_particles_local_site_first(cls, unit_plate):
    """A model whose unit latents come before the globals: the guide's latent
    order differs from the flat layout, and the moments read from the guide
    agree with the empirical moments of its particles."""
    from curvi import ModelView
    from curvi.guide_moments import FlatLayout, gaussian_view

    obs = torch.randn(3, 2)

    def model(obs):
        with pyro.plate("groups", 3, dim=-2):
            u = pyro.sample("u", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(1))
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        with pyro.plate("groups2", 3, dim=-2), pyro.plate("obs", 2, dim=-1):
            pyro.sample("z", dist.Normal(u[..., 0] + u[..., 1], tau), obs=obs)

    guide = cls(model)
    pyro.set_rng_seed(0)
    guide(obs)
    with torch.no_grad():
        for p in params_of(guide):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if unit_plate is None:
        layout = FlatLayout.from_trace(guide.prototype_trace)
    else:
        layout = FlatLayout.from_view(ModelView(model, obs, unit_plate="groups", check_structure=False))
    q = gaussian_view(guide, layout)
    elbo = Trace_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=2)
    _, guide_trace = next(elbo._get_traces(model, guide, (obs,), {}))
    x = q.particles(guide_trace).detach()
    mean, cov = q.moments()
    empirical = torch.cov(x.T)
    dense = {
        "DiagonalCov": lambda c: torch.diag(c.var),
        "FactorCov": lambda c: c.factor @ c.factor.T,
        "LowRankCov": lambda c: c.cov_factor @ c.cov_factor.T + torch.diag(c.cov_diag),
    }[type(cov).__name__](cov)
    assert torch.allclose(x.mean(0), mean.detach(), atol=0.05)
    assert torch.allclose(empirical, dense.detach(), atol=0.08)
