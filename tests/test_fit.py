import importlib
import math
import os
import random

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroParam
from test_docs import documented_objects, usage_blocks
from torch.distributions import constraints

from curvi.fit import FitResult, elbo_converged, fit

# ---------------------------------------------------------------------------
# models, guides and helpers


def normal_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


POISON = {"inf": False, "interrupt": False}


def two_site_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    if POISON["interrupt"]:
        raise KeyboardInterrupt
    if POISON["inf"]:  # Pyro's validation would reject a NaN factor itself
        pyro.factor("poison", torch.tensor(math.inf))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, sigma), obs=x)


class BufferGuide(PyroModule):
    """Mean-field guide with a buffer (running mean of the draws) used in its scale."""

    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.zeros(2))
        self.scale = PyroParam(0.5 * torch.ones(2), constraint=constraints.positive)
        self.register_buffer("running", torch.zeros(2))

    def forward(self, x):
        scale = self.scale * (1.0 + 0.1 * torch.tanh(self.running))
        mu = pyro.sample("mu", dist.Normal(self.loc[0], scale[0]))
        sigma = pyro.sample("sigma", dist.LogNormal(self.loc[1], scale[1]))
        with torch.no_grad():
            self.running.mul_(0.9).add_(0.1 * torch.stack([mu, sigma.log()]))


GUIDES = {
    "AutoNormal": lambda: AutoNormal(two_site_model),
    "BufferGuide": BufferGuide,
}


@pytest.fixture(autouse=True)
def _no_poison():
    POISON.update(inf=False, interrupt=False)
    yield
    POISON.update(inf=False, interrupt=False)


def data():
    return torch.tensor([1.3, 2.2, 0.4, 1.9, 3.1, 2.5, 1.1, 1.7])


def fresh(make_guide, seed=0):
    """A clean slate, as in a new process: empty param store, new guide, new seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return make_guide()


def run(guide, steps, **options):
    options = {"window": 5, "tol": None, "progress": False, **options}
    return fit(two_site_model, guide, data(), steps=steps, **options)


def state(guide):
    """Every number the next step depends on: parameters and buffers."""
    out = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    if isinstance(guide, torch.nn.Module):
        out.update({f"buffer {k}": v.clone() for k, v in guide.named_buffers()})
    return out


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def uninterrupted(make_guide, steps):
    guide = fresh(make_guide)
    result = run(guide, steps)
    return result, state(guide)


def noise_loss(slope, sd=1.0, seed=0, nan_at=None):
    """A loss callable for SVI: -(slope * step + noise), touching no parameters."""
    rng = random.Random(seed)
    count = [0]

    def loss(model, guide, *args, **kwargs):
        count[0] += 1
        if count[0] == nan_at:
            return torch.tensor(math.nan)
        return torch.tensor(-(slope * count[0] + rng.gauss(0.0, sd)))

    return loss


def noop(*args, **kwargs):
    pass


# ---------------------------------------------------------------------------
# fitting and convergence


def test_conjugate_normal_posterior_and_trace_length():
    pyro.set_rng_seed(1)
    x = torch.randn(50) + 3.0
    guide = AutoNormal(normal_model)
    result = fit(
        normal_model,
        guide,
        x,
        steps=1500,
        tol=None,
        progress=False,
        optim=pyro.optim.Adam({"lr": 0.05}),
    )
    n = len(x)
    post_mean, post_sd = x.sum() / (n + 1 / 100), (n + 1 / 100) ** -0.5
    log_evidence = torch.distributions.MultivariateNormal(
        torch.zeros(n), torch.eye(n) + 100.0 * torch.ones(n, n)
    ).log_prob(x)

    assert isinstance(result, FitResult)
    assert len(result.elbo) == result.num_evaluations == 1500
    assert not result.converged and result.message == "reached steps=1500"
    with torch.no_grad():
        assert abs(guide.median()["mu"] - post_mean) < 0.25 * post_sd
        assert abs(pyro.param("AutoNormal.scales.mu") / post_sd - 1.0) < 0.25
    # q can equal the posterior, so the ELBO reaches log p(x) up to MC noise
    assert abs(result.final_elbo - log_evidence) < 0.05
    assert result.final_elbo == pytest.approx(sum(result.elbo[-50:]) / 50)


def test_converges_early_on_an_easy_problem():
    pyro.set_rng_seed(1)
    x = torch.randn(50) + 3.0
    guide = AutoNormal(normal_model)
    result = fit(
        normal_model,
        guide,
        x,
        steps=3000,
        progress=False,
        optim=pyro.optim.Adam({"lr": 0.05}),
    )
    assert result.converged
    assert result.num_evaluations < 3000 and result.num_evaluations % 50 == 0
    assert len(result.elbo) == result.num_evaluations
    assert result.message == f"converged after {result.num_evaluations} evaluations"
    with torch.no_grad():
        exact = x.sum() / (len(x) + 1 / 100)
        assert abs(guide.median()["mu"] - exact) < 0.5 * (len(x) + 1 / 100) ** -0.5


def test_flat_noise_converges_at_the_first_check():
    result = fit(noop, noop, steps=1000, loss=noise_loss(slope=0.0), progress=False)
    assert result.converged and result.num_evaluations == 100


def test_noise_with_rising_trend_does_not_stop():
    # 0.05 nats/step = 2.5 nats per window against noise of sd 1 (2 * se = 0.4)
    result = fit(noop, noop, steps=1000, loss=noise_loss(slope=0.05), progress=False)
    assert not result.converged and result.num_evaluations == 1000
    assert result.message == "reached steps=1000"


def test_tol_floor_stops_a_precise_slow_trend():
    slow = [0.0001 * i for i in range(100)]  # 0.005 nats per window, no noise
    assert elbo_converged(slow, window=50, tol=0.01)
    assert not elbo_converged(slow, window=50, tol=0.001)


def test_convergence_needs_two_windows_and_ignores_a_significant_fall():
    rng = random.Random(0)
    flat = [rng.gauss(0.0, 1.0) for _ in range(100)]
    assert not elbo_converged(flat[:99], window=50)
    falling = [v - 0.05 * i for i, v in enumerate(flat)]
    assert not elbo_converged(falling, window=50)


def test_callback_sees_every_step_and_can_stop():
    seen = []

    def callback(step, elbo):
        seen.append((step, elbo))
        return step == 12

    result = fit(noop, noop, steps=100, loss=noise_loss(0.1), callback=callback, progress=False)
    assert [s for s, _ in seen] == list(range(1, 13))
    assert [e for _, e in seen] == result.elbo
    assert result.num_evaluations == 12 and not result.converged
    assert result.message == "stopped by callback after 12 evaluations"


def test_progress_bar_shows_smoothed_elbo(capsys):
    fit(noop, noop, steps=20, window=5, tol=None, loss=noise_loss(0.0), progress=True)
    err = capsys.readouterr().err
    assert "20/20" in err and "elbo=" in err


def test_result_prints_readably():
    result = fit(noop, noop, steps=30, window=5, tol=None, loss=noise_loss(0.0), progress=False)
    text, rep = str(result), repr(result)
    assert "reached steps=30" in text and "final_elbo" in text and "(30 values)" in text
    assert rep.startswith("FitResult(converged=False, num_evaluations=30,") and "<30 values>" in rep


# ---------------------------------------------------------------------------
# checkpoint and resume


@pytest.mark.parametrize("name", GUIDES)
def test_interrupted_then_resumed_equals_uninterrupted(name, tmp_path):
    make_guide = GUIDES[name]
    path = tmp_path / "fit.pt"
    expected, expected_state = uninterrupted(make_guide, 30)

    first = run(fresh(make_guide), 20, checkpoint=path, checkpoint_every=7)
    assert first.elbo == expected.elbo[:20]

    guide = fresh(make_guide, seed=123)  # new process, different seed
    resumed = run(guide, 30, checkpoint=path, checkpoint_every=7)
    assert resumed.elbo == expected.elbo
    assert resumed.num_evaluations == 30 and len(resumed.elbo) == 30
    assert resumed.message == f"reached steps=30 (resumed from {path} at step 20)"
    assert_same_state(state(guide), expected_state)
    if name == "BufferGuide":
        assert guide.running.abs().sum() > 0  # the buffer did change, and round-tripped


def test_resume_overrides_newer_state_in_memory(tmp_path):
    path = tmp_path / "fit.pt"
    expected, expected_state = uninterrupted(BufferGuide, 30)

    guide = fresh(BufferGuide)
    optim = pyro.optim.Adam({"lr": 0.01})
    run(guide, 20, optim=optim, checkpoint=path)
    run(guide, 7, optim=optim)  # moves params, buffers, Adam state and RNG on
    resumed = run(guide, 30, optim=optim, checkpoint=path)
    assert resumed.elbo == expected.elbo
    assert_same_state(state(guide), expected_state)


def test_keyboard_interrupt_in_callback_leaves_a_resumable_checkpoint(tmp_path):
    path = tmp_path / "fit.pt"
    expected, expected_state = uninterrupted(BufferGuide, 30)

    def stop_at_20(step, elbo):
        if step == 20:
            raise KeyboardInterrupt

    guide = fresh(BufferGuide)
    with pytest.raises(KeyboardInterrupt):
        run(guide, 30, checkpoint=path, checkpoint_every=100, callback=stop_at_20)
    assert torch.load(path, weights_only=False)["step"] == 20

    guide = fresh(BufferGuide, seed=5)
    resumed = run(guide, 30, checkpoint=path)
    assert resumed.elbo == expected.elbo
    assert_same_state(state(guide), expected_state)


@pytest.mark.parametrize("name", GUIDES)
def test_keyboard_interrupt_inside_a_step_saves_the_step_before(name, tmp_path):
    make_guide = GUIDES[name]
    path = tmp_path / "fit.pt"
    expected, expected_state = uninterrupted(make_guide, 30)

    def interrupt_next_step(step, elbo):
        POISON["interrupt"] = step == 24

    with pytest.raises(KeyboardInterrupt):
        run(fresh(make_guide), 30, checkpoint=path, checkpoint_every=10, callback=interrupt_next_step)
    assert torch.load(path, weights_only=False)["step"] == 24

    POISON["interrupt"] = False
    guide = fresh(make_guide, seed=5)
    resumed = run(guide, 30, checkpoint=path)
    assert resumed.elbo == expected.elbo
    assert_same_state(state(guide), expected_state)


def test_periodic_checkpoints_are_atomic_files(tmp_path):
    path = tmp_path / "fit.pt"
    steps_on_disk = []

    def look(step, elbo):
        if os.path.exists(path):
            steps_on_disk.append(torch.load(path, weights_only=False)["step"])

    run(fresh(BufferGuide), 25, checkpoint=path, checkpoint_every=10, callback=look)
    assert sorted(set(steps_on_disk)) == [10, 20]
    assert torch.load(path, weights_only=False)["step"] == 25
    assert os.listdir(tmp_path) == ["fit.pt"]  # no temporary files left


def test_resume_false_starts_afresh(tmp_path):
    path = tmp_path / "fit.pt"
    run(fresh(BufferGuide), 10, checkpoint=path)
    expected, _ = uninterrupted(BufferGuide, 15)
    result = run(fresh(BufferGuide), 15, checkpoint=path, resume=False)
    assert result.elbo == expected.elbo and "resumed" not in result.message
    assert torch.load(path, weights_only=False)["step"] == 15


def test_resuming_a_converged_fit_takes_no_steps(tmp_path):
    path = tmp_path / "fit.pt"
    first = fit(noop, noop, steps=1000, loss=noise_loss(0.0), checkpoint=path, progress=False)
    assert first.converged
    again = fit(noop, noop, steps=1000, loss=noise_loss(0.0), checkpoint=path, progress=False)
    assert again.converged and again.elbo == first.elbo
    assert again.message == f"converged after 100 evaluations (resumed from {path} at step 100)"


# ---------------------------------------------------------------------------
# failures


def test_nan_loss_raises_naming_the_step():
    with pytest.raises(ValueError, match="non-finite loss nan at step 7"):
        fit(noop, noop, steps=100, loss=noise_loss(0.0, nan_at=7), progress=False)


@pytest.mark.filterwarnings("ignore:Encountered \\+inf")
def test_non_finite_loss_keeps_and_saves_the_last_good_step(tmp_path):
    path = tmp_path / "fit.pt"
    expected, expected_state = uninterrupted(GUIDES["AutoNormal"], 10)
    _, state_at_6 = uninterrupted(GUIDES["AutoNormal"], 6)

    def poison_next_step(step, elbo):
        POISON["inf"] = step == 6

    guide = fresh(GUIDES["AutoNormal"])
    with pytest.raises(ValueError, match="non-finite loss -inf at step 7"):
        run(guide, 10, checkpoint=path, callback=poison_next_step)
    assert_same_state(state(guide), state_at_6)  # the optimiser never saw the NaN
    assert torch.load(path, weights_only=False)["step"] == 6

    POISON["inf"] = False  # resume in the same process, same guide: no stale gradients
    resumed = run(guide, 10, checkpoint=path)
    assert resumed.elbo == expected.elbo
    assert_same_state(state(guide), expected_state)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"steps": 0}, ValueError, "steps must be an integer >= 1"),
        ({"steps": 2.5}, TypeError, "steps must be an integer >= 1"),
        ({"window": 1}, ValueError, "window must be an integer >= 2"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every must be an integer >= 1"),
        ({"tol": -1.0}, ValueError, "tol must be"),
        ({"tol": math.nan}, ValueError, "tol must be"),
        ({"tol": "0.1"}, TypeError, "tol must be"),
        ({"optim": torch.optim.Adam}, TypeError, "optim must be a pyro.optim.PyroOptim"),
        ({"checkpoint": 3}, TypeError, "checkpoint must be a file path"),
        ({"checkpoint": "/no/such/directory/fit.pt"}, ValueError, "checkpoint directory .* does not exist"),
        ({"callback": "stop"}, TypeError, "callback must be callable"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        fit(noop, noop, **{"steps": 10, "progress": False, **options})


def test_unreadable_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        run(fresh(BufferGuide), 5, checkpoint=garbage)
    other = tmp_path / "other.pt"
    torch.save({"step": 3}, other)
    with pytest.raises(ValueError, match="not a curvi.fit checkpoint"):
        run(fresh(BufferGuide), 5, checkpoint=other)


def test_checkpoint_with_other_parameter_names(tmp_path):
    path = tmp_path / "fit.pt"
    run(fresh(GUIDES["AutoNormal"]), 5, checkpoint=path)
    guide = fresh(lambda: AutoDiagonalNormal(two_site_model))
    with pytest.raises(ValueError, match="'AutoDiagonalNormal.loc' is not in the checkpoint"):
        run(guide, 10, checkpoint=path)
    assert not any(name.startswith("AutoNormal") for name in pyro.get_param_store())
    assert torch.load(path, weights_only=False)["step"] == 5  # left as it was


def test_checkpoint_with_other_shapes(tmp_path):
    def model(d):
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([d]).to_event(1))

    path = tmp_path / "fit.pt"
    pyro.clear_param_store()
    fit(model, AutoNormal(model), 2, steps=5, checkpoint=path, progress=False)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"'AutoNormal.locs.z' has shape \(3,\), the checkpoint \(2,\)"):
        fit(model, AutoNormal(model), 3, steps=10, checkpoint=path, progress=False)


def test_checkpoint_with_more_steps_than_asked(tmp_path):
    path = tmp_path / "fit.pt"
    run(fresh(BufferGuide), 10, checkpoint=path)
    with pytest.raises(ValueError, match="already holds 10 steps, more than steps=5"):
        run(fresh(BufferGuide), 5, checkpoint=path)


# ---------------------------------------------------------------------------
# documentation


def usage_examples():
    module = importlib.import_module("curvi.fit")
    return [
        pytest.param(code, id=f"{qualname}#{i}")
        for qualname, obj in documented_objects(module)
        for i, code in enumerate(usage_blocks(obj.__doc__ or ""))
    ]


def test_every_public_object_has_an_example():
    assert len(usage_examples()) == 4  # the module, FitOutcome, elbo_converged, fit


@pytest.mark.parametrize("code", usage_examples())
def test_usage_example_runs(code):
    exec(compile(code, "<curvi.fit usage>", "exec"), {})


def test_a_rise_inside_the_first_window_is_not_mistaken_for_noise():
    """The windows' own variances would count this climb as noise; the
    successive-difference estimate of the noise does not."""
    import random

    from curvi.fit import elbo_converged

    rng = random.Random(1)
    trace = [-200 + 60 * (1 - 0.95**i) + rng.gauss(0, 2.0) for i in range(100)]
    assert not elbo_converged(trace, window=50)
    settled = [-140 + rng.gauss(0, 2.0) for _ in range(100)]
    assert elbo_converged(settled, window=50)


def trace_loss(values):
    """A loss callable for SVI that returns -values[step], touching no parameters."""
    count = [0]

    def loss(model, guide, *args, **kwargs):
        count[0] += 1
        return torch.tensor(-values[count[0] - 1])

    return loss


def test_a_fall_by_orders_of_magnitude_is_divergence_not_convergence():
    """The ELBO falls from about −40 to −1e6 and sits there: the fit stops as
    diverged, with a warning, whatever the stopping tolerance."""
    rng = random.Random(0)
    values = [-40.0 + rng.gauss(0, 1) for _ in range(100)] + [-1e6 + rng.gauss(0, 1e3) for _ in range(900)]
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = fit(noop, noop, steps=1000, tol=None, loss=trace_loss(values), progress=False)
    assert not result.converged and result.num_evaluations == 150
    assert result.message.startswith("diverged: the windowed mean ELBO fell from -39.9")


def test_settling_below_the_best_window_is_not_convergence():
    """A drop of 30 nats that then sits still: the windows agree, but the fit
    is not converged (the optimiser left a better region) and says so."""
    rng = random.Random(0)
    rising = [-100.0 + 0.1 * i + rng.gauss(0, 0.5) for i in range(100)]
    values = rising + [-130.0 + rng.gauss(0, 0.5) for _ in range(400)]
    result = fit(noop, noop, steps=500, loss=trace_loss(values), progress=False)
    assert not result.converged and result.num_evaluations == 200
    assert "below its best windowed mean -92" in result.message


def test_the_final_elbo_carries_its_monte_carlo_standard_error():
    rng = random.Random(3)
    values = [-10.0 + rng.gauss(0, 2.0) for _ in range(2000)]
    result = fit(noop, noop, steps=2000, window=400, tol=None, loss=trace_loss(values), progress=False)
    assert result.final_elbo_se == pytest.approx(2.0 / math.sqrt(400), rel=0.2)
    assert abs(result.final_elbo + 10.0) < 4 * result.final_elbo_se


def test_a_resumed_fit_remembers_its_best_window_for_divergence(tmp_path):
    """The best windowed ELBO is rebuilt from the checkpoint's trace: a fall
    right after a resume is still a fall from the best window before it."""
    rng = random.Random(0)
    values = [-40.0 + rng.gauss(0, 1) for _ in range(100)] + [-1e6 + rng.gauss(0, 1e3) for _ in range(900)]
    path = tmp_path / "fit.pt"
    fit(noop, noop, steps=100, tol=None, loss=trace_loss(values), checkpoint=path, progress=False)
    resumed_loss = trace_loss(values[100:])  # the loss goes on where the first fit stopped
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = fit(noop, noop, steps=1000, tol=None, loss=resumed_loss, checkpoint=path, progress=False)
    assert not result.converged and result.num_evaluations == 150
    assert result.message.startswith("diverged: the windowed mean ELBO fell from -39.9")
