"""Benchmark: the compositional natural gradient (``curvi.compositional.CompositionalNG``)
against Adam, on amortised and flow guides whose weights it preconditions.

Problems (float32, one torch thread):

* ``vae2``, ``vae10`` -- a variational autoencoder on the 8 × 8 handwritten
  digits of ``curvi.datasets.load_digits`` (binarised; the fixed split of
  ``split_digits``: 1 500 train, 297 test images). Model: z ~ N(0, I_L)
  (L = 2, 10), x | z ~ Bernoulli(logits = decoder(z)), decoder an MLP
  L → 128 → 64 (softplus); guide: z | x ~ N(loc(x), diag scale(x)²), encoder
  an MLP 64 → 128 → 2L (softplus; scale = softplus(·) + 1e-4). One data plate
  over the 1 500 training images, subsampled: minibatches of
  ``BATCH_SIZE`` = 100 (ELBO scaled by 1 500 / 100, as ``pyro.plate``
  does), the same sequence of minibatches for every method at a given
  seed. The decoder's weights are model parameters, trained jointly with
  the encoder (see ``DECODER_NOTE`` for how each method updates them).
* ``flow`` -- the hierarchical logistic model of ``benchmarks/common.py``
  (20 groups × 10 observations; latents beta (2), sigma (2), u (20 × 2))
  with a coupling-flow guide, one flow per site (``SiteFlowGuide``): two
  affine couplings on R² with a swap between them for beta and for sigma
  (then exp), and two *conditional* affine couplings for each group's u,
  conditioned on the group's 20 data values -- amortised over the groups,
  as the VAE's encoder is over images. Hypernets: Pyro's ``DenseNN`` /
  ``ConditionalDenseNN``, one hidden layer of 32 units (``nn.Linear``). No
  model parameters.
* ``flowjoint`` -- the same model with Pyro's ``AutoNormalizingFlow``: one
  flow over all 44 unconstrained coordinates (three affine couplings,
  hypernets with one hidden layer of 88 units, reversals between them),
  read off into the sites by Delta sites; the sites are dependent under q.

Methods, each from the same initial weights at a given seed:

* Adam (Pyro's ``SVI`` with ``Trace_ELBO``) at each learning rate of a grid
  (default 1e-3, 3e-3, 1e-2, 3e-2); "best Adam" is the grid point with the
  best median final test ELBO;
* ``CompositionalNG`` with no options but ``mode`` ("empirical" K-FAC,
  "pushforward", "staged") -- what a user gets; the constructor's default
  mode is marked "(default)";
* a few configurations beyond the defaults (``EXTRAS``): for the VAEs the
  default mode with ``adam_lr`` = ``DECODER_LR`` (1e-2) -- CompositionalNG
  steps the decoder (a model parameter, outside the guide's layers) by its
  own Adam at ``adam_lr`` (default 1e-3), while the best Adam moves it at
  its own, larger, rate, so this row separates the encoder's
  preconditioning from the decoder's step size; for the flows, pushforward
  with ``num_particles=4, kl_clip=1e-3``, the setting curvi's docs
  recommend for flows over global latents; for ``flowjoint`` also
  pushforward with ``stick_the_landing=False``: with STL (the default) the
  Delta sites' log-Jacobian terms (sigma's exp) drop out of
  CompositionalNG's gradient (see the results file).

One ELBO particle per step for every method.

Measured for 5 seeds (medians and min–max over the seeds): the test ELBO
and the IWAE bound (K = 100 importance samples, ``log mean_k w_k``) on the
297 test images (per image, nats), or for the flows the ELBO (1 000 fresh
draws) and IWAE bound (K = 100, averaged over 10 independent sets) of the
posterior of the simulated data, at checkpoints over iterations, with the
wall time spent in steps (evaluations excluded). The evaluation draws use
a fixed generator, the same at every checkpoint for every method (common
random numbers), and leave the training stream untouched.

Target: T = best Adam's median test ELBO at the end of its budget;
"iterations to T" is a run's first checkpoint with test ELBO ≥ T (an upper
bound at the checkpoint grid's resolution), the median over seeds (a
method reaching T in fewer than 3 of 5 seeds has no median); likewise the
iterations to best Adam's median ELBO at budget/10 and budget/3, so that an
early speed-up shows even when a method stops short of T. The issue's
targets: ≥ 3× fewer iterations than best Adam to T, at ≤ 2× its cost per
iteration (median ms per step, same process, seeds interleaved).

A run whose loss or parameters turn non-finite (or that raises) is stopped
and reported by name, counted as −∞ in the medians.

Usage::

    python benchmarks/compositional.py                  # all -> benchmarks/results/compositional.md
    python benchmarks/compositional.py --problems flow  # one problem; the others' sections kept
    python benchmarks/compositional.py --quick          # 2 seeds, short runs; printed only

Pins torch and OpenBLAS to one thread (``--threads``); the 1-minute load
average is recorded before and after every problem (the machine is shared).
"""

from __future__ import annotations

import os

# One BLAS thread, set before torch loads OpenBLAS (as benchmarks/glmm.py does):
# the machine is shared, and several BLAS threads on small matrices are slower
# and erratic there. A value already in the environment is kept and reported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pyro.distributions.transforms as T  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, RenyiELBO, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormalizingFlow  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import curvi_revision, simulate, torch_model  # noqa: E402

from curvi.datasets import load_digits, split_digits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "compositional.md"
PROBLEMS = ("vae2", "vae10", "flow", "flowjoint")
MODES = ("empirical", "pushforward", "staged")
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SEEDS = 5
BATCH_SIZE = 100
HIDDEN = 128
FLOW_GROUPS = 20
IWAE_K = 100
EVAL_SEED = 12345
#: The decoder step of the extra VAE configuration: best Adam's learning rate on
#: both VAEs in a check before the run (seed 0, 1 500 iterations; 3e-2 was worse).
DECODER_LR = 1e-2
#: Iterations and checkpoints of each problem (the same for every method).
BUDGET = {"vae2": 1200, "vae10": 1200, "flow": 450, "flowjoint": 450}
QUICK_BUDGET = {"vae2": 150, "vae10": 150, "flow": 60, "flowjoint": 60}


def checkpoints(budget: int) -> list[int]:
    """0, a few early points (5, 10, 20, 30, 50, 75 below budget / 30), then every budget / 30."""
    step = max(1, budget // 30)
    early = [p for p in (5, 10, 20, 30, 50, 75) if p < step]
    return sorted({0, *early, *range(step, budget, step), budget})


# ------------------------------------------------------------------ problems
class VAEProblem:
    """The digits VAE with latent dimension ``latent`` (module docstring)."""

    def __init__(self, latent: int, hidden: int = HIDDEN, batch_size: int = BATCH_SIZE, num_test=None):
        self.name = f"vae{latent}"
        self.latent, self.hidden, self.batch_size = latent, hidden, batch_size
        train, test = split_digits(load_digits())
        self.train = train.images.to(torch.get_default_dtype())
        self.test = test.images.to(torch.get_default_dtype())[:num_test]
        self.num_data = len(self.train)
        self.metric = "test ELBO / image"
        self.iwae_metric = f"test IWAE (K={IWAE_K}) / image"

    def build(self, seed: int):
        """Fresh encoder and decoder (initialised from ``seed``), the model and guide."""
        torch.manual_seed(seed)
        latent, hidden, n = self.latent, self.hidden, self.num_data
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.Softplus(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Softplus(), nn.Linear(hidden, 64))
        encoder, decoder = self.encoder, self.decoder

        def model(x, index):
            pyro.module("decoder", decoder)
            with pyro.plate("data", n, subsample=index):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([latent]).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

        def guide(x, index):
            pyro.module("encoder", encoder)
            with pyro.plate("data", n, subsample=index):
                loc, scale = self.encode(x)
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

        return model, guide

    def encode(self, x):
        out = self.encoder(x)
        return out[..., : self.latent], nn.functional.softplus(out[..., self.latent :]) + 1e-4

    def batches(self, seed: int):
        """The minibatch sequence of a seed: (images, their indices) per step."""
        generator = torch.Generator().manual_seed(10_000 + seed)
        while True:
            for index in torch.randperm(self.num_data, generator=generator).split(self.batch_size):
                if len(index) == self.batch_size:
                    yield (self.train[index], index)

    @torch.no_grad()
    def evaluate(self, guide) -> tuple[float, float]:
        """Test ELBO and IWAE bound per image: K importance samples per test image."""
        generator = torch.Generator().manual_seed(EVAL_SEED)
        x = self.test
        loc, scale = self.encode(x)
        eps = torch.randn((IWAE_K, *loc.shape), generator=generator, dtype=loc.dtype)
        z = loc + scale * eps
        log_w = (
            dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            + dist.Bernoulli(logits=self.decoder(z)).log_prob(x).sum(-1)
            - dist.Normal(loc, scale).log_prob(z).sum(-1)
        )
        elbo = log_w.mean(0).mean()
        iwae = (torch.logsumexp(log_w, 0) - math.log(IWAE_K)).mean()
        return float(elbo), float(iwae)


class SiteFlowGuide(nn.Module):
    """A coupling-flow guide for :func:`common.torch_model`, one flow per site:
    ``beta`` and ``sigma`` (through exp) each by two affine couplings on R²
    with a swap between them; each group's ``u`` by two *conditional* affine
    couplings on R², conditioned on the group's data (its 10 x and 10 y):
    amortised over the groups, as a VAE's encoder is over images. The sites
    are independent under q. Every trainable weight is in a coupling's
    hypernet (Pyro's ``DenseNN`` / ``ConditionalDenseNN``: ``nn.Linear``
    layers, one hidden layer of ``hidden`` units, ReLU)."""

    def __init__(self, x, y, hidden: int = 32):
        super().__init__()
        self.context = torch.cat([x, y], -1).unsqueeze(-2)  # (groups, 1, 20)
        self.swap = T.Permute(torch.tensor([1, 0]))
        self.beta_flow = nn.ModuleList([T.affine_coupling(2, hidden_dims=[hidden]) for _ in range(2)])
        self.sigma_flow = nn.ModuleList([T.affine_coupling(2, hidden_dims=[hidden]) for _ in range(2)])
        self.u_flow = nn.ModuleList(
            [T.conditional_affine_coupling(2, self.context.shape[-1], hidden_dims=[hidden]) for _ in range(2)]
        )

    def forward(self, x, y):
        pyro.module("flow_guide", self)
        base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        pyro.sample(
            "beta", dist.TransformedDistribution(base, [self.beta_flow[0], self.swap, self.beta_flow[1]])
        )
        sigma_layers = [self.sigma_flow[0], self.swap, self.sigma_flow[1], T.ExpTransform()]
        pyro.sample("sigma", dist.TransformedDistribution(base, sigma_layers))
        u_layers = [self.u_flow[0].condition(self.context), self.swap, self.u_flow[1].condition(self.context)]
        with pyro.plate("groups", x.shape[0], dim=-2):
            u_base = dist.Normal(torch.zeros(x.shape[0], 1, 2), 1.0).to_event(1)
            pyro.sample("u", dist.TransformedDistribution(u_base, u_layers))


def joint_flow_guide(x, y):
    """Pyro's ``AutoNormalizingFlow`` for :func:`common.torch_model`: one flow over
    all 4 + 2·groups unconstrained coordinates -- three affine couplings (hypernets
    ``DenseNN`` with one hidden layer of 2d units) with reversals between them --
    over a fixed N(0, I), read off into the model's sites by Delta sites."""

    def couplings(dim):
        reverse = T.Permute(torch.arange(dim - 1, -1, -1))
        layers = [T.affine_coupling(dim, hidden_dims=[2 * dim]) for _ in range(3)]
        return T.ComposeTransformModule([layers[0], reverse, layers[1], reverse, layers[2]])

    guide = AutoNormalizingFlow(torch_model, couplings)
    guide(x, y)  # Pyro builds the flow lazily: make its weights now
    return guide


class FlowProblem:
    """A coupling-flow guide on the hierarchical benchmark model (module docstring):
    :class:`SiteFlowGuide` (``flow``) or :func:`joint_flow_guide` (``flowjoint``)."""

    metric = "ELBO (1 000 draws)"
    iwae_metric = f"IWAE (K={IWAE_K})"

    def __init__(self, joint=False, groups: int = FLOW_GROUPS, eval_draws: int = 1000, iwae_sets: int = 10):
        x, y, *_ = simulate(groups, seed=0)
        dtype = torch.get_default_dtype()
        self.x, self.y = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
        self.joint, self.name = joint, "flowjoint" if joint else "flow"
        self.eval_draws, self.iwae_sets = eval_draws, iwae_sets

    def build(self, seed: int):
        torch.manual_seed(seed)
        guide = joint_flow_guide(self.x, self.y) if self.joint else SiteFlowGuide(self.x, self.y)
        return torch_model, guide

    def batches(self, seed: int):
        while True:
            yield (self.x, self.y)

    @torch.no_grad()
    def evaluate(self, guide) -> tuple[float, float]:
        with torch.random.fork_rng():
            torch.manual_seed(EVAL_SEED)
            elbo = Trace_ELBO(num_particles=self.eval_draws, vectorize_particles=True, max_plate_nesting=2)
            elbo = -elbo.loss(torch_model, guide, self.x, self.y)
            iwae = RenyiELBO(alpha=0.0, num_particles=IWAE_K, vectorize_particles=True, max_plate_nesting=2)
            bounds = [-iwae.loss(torch_model, guide, self.x, self.y) for _ in range(self.iwae_sets)]
        return float(elbo), float(statistics.fmean(bounds))


def make_problem(name: str, quick: bool = False):
    if name.startswith("vae"):
        return VAEProblem(int(name[3:]))
    if name in ("flow", "flowjoint"):
        draws = dict(eval_draws=500, iwae_sets=5) if quick else dict(eval_draws=1000, iwae_sets=10)
        return FlowProblem(joint=name == "flowjoint", **draws)
    raise ValueError(f"unknown problem {name!r}; expected one of {PROBLEMS}")


# ------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """Adam at ``lr`` (``mode`` None), or CompositionalNG in ``mode`` with its
    defaults but ``options`` ((keyword, value) pairs)."""

    label: str
    mode: str | None = None
    lr: float | None = None
    options: tuple = ()

    @property
    def is_adam(self) -> bool:
        return self.mode is None


def compositional_available() -> str | None:
    """None when ``curvi.compositional.CompositionalNG`` imports, else why not."""
    try:
        from curvi.compositional import CompositionalNG  # noqa: F401
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"{type(e).__name__}: {e}"
    return None


def default_mode() -> str | None:
    from curvi.compositional import CompositionalNG

    param = inspect.signature(CompositionalNG).parameters.get("mode")
    return None if param is None or param.default is inspect.Parameter.empty else param.default


#: Configurations beyond each mode's defaults, by problem: ``"default"`` stands
#: for the constructor's default mode. VAEs: the decoder (stepped by
#: CompositionalNG's own Adam at ``adam_lr``, default 1e-3) at best Adam's rate.
#: Flows: the setting curvi's docs recommend for flows over global latents
#: (``num_particles=4``, ``kl_clip=1e-3``); flowjoint: without sticking the
#: landing too (see the module docstring).
EXTRAS = {
    "vae2": [("default", (("adam_lr", DECODER_LR),))],
    "vae10": [("default", (("adam_lr", DECODER_LR),))],
    "flow": [("pushforward", (("num_particles", 4), ("kl_clip", 1e-3)))],
    "flowjoint": [
        ("pushforward", (("num_particles", 4), ("kl_clip", 1e-3))),
        ("pushforward", (("stick_the_landing", False),)),
    ],
}


def methods(adam_lrs, modes, extras=()) -> list[Method]:
    """The Adam grid, each mode with its defaults, and the ``extras``
    (mode, options) of :data:`EXTRAS`."""
    out = [Method(f"Adam lr={lr:g}", lr=lr) for lr in adam_lrs]
    if modes and compositional_available() is None:
        default = default_mode()
        out += [Method(f"{mode}{' (default)' if mode == default else ''}", mode=mode) for mode in modes]
        for mode, options in extras:
            mode = default if mode == "default" else mode
            if mode in modes:
                label = f"{mode}, " + ", ".join(
                    f"{k}={v:g}" if not isinstance(v, bool) else f"{k}={v}" for k, v in options
                )
                out.append(Method(label, mode=mode, options=options))
    return out


#: How each method updates the VAE decoder (a model parameter).
DECODER_NOTE = (
    "Adam trains encoder and decoder together (one `SVI` over all parameters, one learning rate). "
    "CompositionalNG K-FAC-preconditions the encoder's `nn.Linear` layers (the guide) and steps "
    "every other parameter the model and guide use -- the decoder -- by its own Adam on the ELBO's "
    "gradient, at `adam_lr` (default 1e-3; the `adam_lr=` row sets it)."
)


def optimiser(method: Method, model, guide):
    if method.is_adam:
        return SVI(model, guide, pyro.optim.Adam({"lr": method.lr}), Trace_ELBO())
    from curvi.compositional import CompositionalNG

    return CompositionalNG(model, guide, mode=method.mode, **dict(method.options))


# ---------------------------------------------------------------------- runs
@dataclass
class Run:
    """One method at one seed: the evaluations at the checkpoints, and how it ended."""

    method: Method
    seed: int
    iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # time in steps up to each checkpoint
    elbo: list[float] = field(default_factory=list)
    iwae: list[float] = field(default_factory=list)
    failure: str | None = None
    step_seconds: float = float("nan")  # per step, after the first tenth of the budget
    clips: list[float] = field(default_factory=list)  # CompositionalNG's KL-clip factor ν per step

    def final(self, values) -> float:
        return -math.inf if self.failure else values[-1]


def finite_params() -> bool:
    return all(bool(torch.isfinite(p).all()) for p in pyro.get_param_store().values())


def run_one(problem, method: Method, seed: int, budget: int, points: list[int]) -> Run:
    pyro.clear_param_store()
    model, guide = problem.build(seed)
    run = Run(method, seed)
    batches = problem.batches(seed)
    torch.manual_seed(1_000 + seed)  # the training stream: same for every method at a seed
    try:
        opt = optimiser(method, model, guide)
    except Exception as e:  # noqa: BLE001 - a method that cannot be set up is a result
        run.failure = f"set-up: {type(e).__name__}: {str(e).splitlines()[0]}"
        return run
    spent, done, steady = 0.0, 0, [0.0, 0]  # steady: seconds and steps after budget / 10
    for point in points:
        start, steps = time.perf_counter(), point - done
        try:
            for _ in range(steps):
                loss = opt.step(*next(batches))
                if hasattr(opt, "last_clip"):
                    run.clips.append(float(opt.last_clip))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss {loss} at iteration {done + 1}")
                done += 1
        except Exception as e:  # noqa: BLE001 - divergence or a crash is a result
            spent += time.perf_counter() - start
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            run.failure = f"{type(e).__name__} at iteration {done + 1}: {message}"
            break
        elapsed = time.perf_counter() - start
        spent += elapsed
        if done - steps >= budget // 10:
            steady[0] += elapsed
            steady[1] += steps
        if not finite_params():
            run.failure = f"non-finite parameters by iteration {done}"
            break
        try:
            elbo, iwae = problem.evaluate(guide)
        except Exception as e:  # noqa: BLE001 - e.g. a guide whose sigma draws underflow to 0
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            run.failure = f"evaluation raised {type(e).__name__} at iteration {done}: {message}"
            break
        if not (math.isfinite(elbo) and math.isfinite(iwae)):
            run.failure = f"non-finite test bound at iteration {done}"
            break
        run.iterations.append(done)
        run.seconds.append(spent)
        run.elbo.append(elbo)
        run.iwae.append(iwae)
    run.step_seconds = steady[0] / steady[1] if steady[1] else float("nan")
    return run


# ------------------------------------------------------------------ summaries
def median(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def spread(values, digits=2):
    """median [min, max], −∞ (a failed run) written 'fail'."""

    def fmt(v):
        return "fail" if v == -math.inf else f"{v:.{digits}f}"

    if not values:
        return "–"
    return f"{fmt(median(values))} [{fmt(min(values))}, {fmt(max(values))}]"


def value_at(run: Run, values, iteration: int) -> float:
    """The evaluation at a checkpoint; −∞ if the run had failed before it."""
    if iteration in run.iterations:
        return values[run.iterations.index(iteration)]
    return -math.inf


def value_at_time(run: Run, values, seconds: float) -> float:
    """The last evaluation made within ``seconds`` of stepping (NaN before the first
    step; −∞ once a failed run has stopped)."""
    best = float("nan")
    for s, v in zip(run.seconds, values):
        if s <= seconds:
            best = v
    if run.failure and run.seconds and seconds > run.seconds[-1]:
        return -math.inf
    return best


def iterations_to(run: Run, target: float) -> float:
    for it, v in zip(run.iterations, run.elbo):
        if v >= target:
            return it
    return math.inf


def seconds_to(run: Run, target: float) -> float:
    for s, v in zip(run.seconds, run.elbo):
        if v >= target:
            return s
    return math.inf


def median_reached(values, seeds):
    """Median over seeds with ∞ for 'never': defined when most seeds reached it."""
    reached = sorted(values)
    return reached[len(reached) // 2] if sum(math.isfinite(v) for v in values) > seeds // 2 else math.inf


@dataclass
class Summary:
    method: Method
    runs: list[Run]
    final_elbo: float
    final_iwae: float
    ms_per_step: float
    iters_to_target: float = math.inf
    seconds_to_target: float = math.inf
    reached: int = 0
    #: at each level (best Adam's median ELBO at an earlier checkpoint k, keyed by k):
    #: median iterations to reach it and the seeds that did
    to_levels: dict = field(default_factory=dict)


def summarise(runs_by_method: dict[Method, list[Run]], level_points=()):
    """Per-method summaries, best Adam, and the target T; and, for each checkpoint
    k of ``level_points``, the iterations to best Adam's median ELBO at k."""
    summaries = {}
    for method, runs in runs_by_method.items():
        summaries[method] = Summary(
            method,
            runs,
            final_elbo=median([r.final(r.elbo) for r in runs]),
            final_iwae=median([r.final(r.iwae) for r in runs]),
            ms_per_step=1e3 * median([r.step_seconds for r in runs]),
        )
    adams = [s for s in summaries.values() if s.method.is_adam]
    best = max(adams, key=lambda s: s.final_elbo) if adams else None
    target = best.final_elbo if best and math.isfinite(best.final_elbo) else None
    if target is not None:
        for s in summaries.values():
            its = [iterations_to(r, target) for r in s.runs]
            s.reached = sum(math.isfinite(v) for v in its)
            s.iters_to_target = median_reached(its, len(s.runs))
            s.seconds_to_target = median_reached([seconds_to(r, target) for r in s.runs], len(s.runs))
        for k in level_points:
            level = median([value_at(r, r.elbo, k) for r in best.runs])
            for s in summaries.values():
                its = [iterations_to(r, level) for r in s.runs]
                s.to_levels[k] = (level, median_reached(its, len(s.runs)), sum(map(math.isfinite, its)))
    return summaries, best, target


def failures(runs):
    """The failed runs, grouped by what went wrong: 'seeds 0 (it 2), 3 (it 5):
    ValueError at iteration ·: message'; 'none'."""
    groups = {}
    for r in runs:
        if r.failure:
            found = re.search(r"(?:at|by) iteration (\d+)", r.failure)
            key = re.sub(r"((?:at|by) iteration )\d+", r"\1·", r.failure)
            groups.setdefault(key, []).append(f"{r.seed}" + (f" (it {found.group(1)})" if found else ""))
    if not groups:
        return "none"
    parts = []
    for message, seeds in groups.items():
        if len(message) > 170:
            message = message[:170].rsplit(" ", 1)[0] + " …"
        parts.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}: {message.replace('|', '/')}")
    return "; ".join(parts)


def clipping(runs):
    """The share of CompositionalNG's steps whose KL clip bound (ν < 1), and the
    median ν over all steps of all seeds; '–' for Adam."""
    clips = [c for r in runs for c in r.clips]
    if not clips:
        return "–"
    share = sum(c < 1 for c in clips) / len(clips)
    return f"{100 * share:.0f}% ({statistics.median(clips):.2g})"


def fmt_ms(v):
    return "–" if math.isnan(v) else f"{v:.2f}"


def fmt_count(v):
    return "never" if v == math.inf else f"{v:.0f}"


def problem_section(problem, budget, points, summaries, best, target, seeds, notes):
    label = {s.method: s.method.label for s in summaries.values()}
    if best is not None:
        label[best.method] = f"**{best.method.label}** (best Adam)"
    lines = [f"Budget {budget} iterations; {seeds} seeds; medians [min, max] over the seeds."]
    if target is not None:
        lines.append(
            f"Target T = best Adam's ({best.method.label}) median {problem.metric} at iteration "
            f"{budget}: **{target:.3f}**."
        )
    lines += [
        "",
        f"| method | final {problem.metric} | final {problem.iwae_metric} | iterations to T "
        "(seeds reaching T) | best Adam's iterations / these | seconds to T | ms / iteration | "
        "cost / best Adam's | steps KL-clipped (median ν) | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summaries.values():
        runs = s.runs
        speedup = cost = "–"
        if best is not None:
            if math.isfinite(s.iters_to_target) and math.isfinite(best.iters_to_target) and s.iters_to_target:
                speedup = f"{best.iters_to_target / s.iters_to_target:.2f}×"
            if math.isfinite(s.ms_per_step):
                cost = f"{s.ms_per_step / best.ms_per_step:.2f}×"
        lines.append(
            f"| {label[s.method]} | {spread([r.final(r.elbo) for r in runs])} | "
            f"{spread([r.final(r.iwae) for r in runs])} | {fmt_count(s.iters_to_target)} "
            f"({s.reached}/{len(runs)}) | {speedup} | "
            f"{'never' if s.seconds_to_target == math.inf else f'{s.seconds_to_target:.1f}'} | "
            f"{fmt_ms(s.ms_per_step)} | {cost} | {clipping(runs)} | {failures(runs)} |"
        )
    if best is not None and best.to_levels:
        ks = sorted(best.to_levels)
        lines += [
            "",
            "Iterations to the ELBO best Adam reaches (median) at an earlier checkpoint k, and at the end "
            "(T): median over seeds (seeds reaching it), and best Adam's iterations / these:",
            "",
            "| method | "
            + " | ".join(f"to {best.to_levels[k][0]:.2f} (best Adam at it {k})" for k in ks)
            + f" | to T = {target:.2f} |",
            "|---|" + "---:|" * (len(ks) + 1),
        ]
        for s in summaries.values():
            cells = []
            for k in ks:
                _, n, reached = s.to_levels[k]
                ref = best.to_levels[k][1]
                ratio = f", {ref / n:.2f}×" if math.isfinite(n) and n and math.isfinite(ref) else ""
                cells.append(f"{fmt_count(n)} ({reached}/{len(s.runs)}){ratio}")
            n, ref = s.iters_to_target, best.iters_to_target
            ratio = f", {ref / n:.2f}×" if math.isfinite(n) and n and math.isfinite(ref) else ""
            cells.append(f"{fmt_count(n)} ({s.reached}/{len(s.runs)}){ratio}")
            lines.append(f"| {label[s.method]} | " + " | ".join(cells) + " |")
    shown = [p for p in points if p in _display_points(points)]
    for metric, getter in ((problem.metric, "elbo"), (problem.iwae_metric, "iwae")):
        lines += [
            "",
            f"{metric} against iterations (median [min, max]):",
            "",
            "| method | " + " | ".join(f"it {p}" for p in shown) + " |",
            "|---|" + "---:|" * len(shown),
        ]
        for s in summaries.values():
            cells = [spread([value_at(r, getattr(r, getter), p) for r in s.runs]) for p in shown]
            lines.append(f"| {label[s.method]} | " + " | ".join(cells) + " |")
    times = _display_times(summaries)
    if times:
        lines += [
            "",
            f"{problem.metric} against wall time in steps (the last checkpoint within each time; "
            "median [min, max]; '–' before a method's first checkpoint):",
            "",
            "| method | " + " | ".join(f"{t:g} s" for t in times) + " |",
            "|---|" + "---:|" * len(times),
        ]
        for s in summaries.values():
            cells = []
            for t in times:
                values = [value_at_time(r, r.elbo, t) for r in s.runs]
                cells.append("–" if any(math.isnan(v) for v in values) else spread(values))
            lines.append(f"| {label[s.method]} | " + " | ".join(cells) + " |")
    lines += ["", *notes]
    return "\n".join(lines)


def _display_points(points):
    budget = points[-1]
    wanted = [0, budget // 30, budget // 15, budget // 10, budget // 6, budget // 3, budget // 2, budget]
    return {min(points, key=lambda p: abs(p - w)) for w in wanted}


def _display_times(summaries):
    longest = max((max(r.seconds, default=0.0) for s in summaries.values() for r in s.runs), default=0.0)
    if longest <= 0:
        return []
    return sorted({float(f"{longest * f:.2g}") for f in (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)})


def verdict(problem, summaries, best, target):
    """The issue's targets for each CompositionalNG mode, as measured."""
    if best is None or target is None:
        return ["- No finite best-Adam target: the speed-up is not defined."]
    out = []
    for s in summaries.values():
        if s.method.is_adam:
            continue
        if math.isnan(s.ms_per_step):
            out.append(
                f"- {problem.name}, {s.method.label}: failed in every seed (table above): misses both."
            )
            continue
        cost = s.ms_per_step / best.ms_per_step
        if math.isfinite(s.iters_to_target):
            speedup = best.iters_to_target / s.iters_to_target
            speed = f"{speedup:.2f}× fewer iterations to T ({'meets' if speedup >= 3 else 'misses'} ≥ 3×)"
        else:
            speed = f"never reaches T in most seeds ({s.reached}/{len(s.runs)}): misses ≥ 3×"
        early = []
        for k, (level, n, _) in sorted(s.to_levels.items()):
            ref = best.to_levels[k][1]
            if math.isfinite(n) and n and math.isfinite(ref):
                early.append(f"{ref / n:.2f}× to {level:.2f} (best Adam's at it {k})")
            else:
                early.append(f"never to {level:.2f} (best Adam's at it {k})")
        speed += f" [earlier levels: {', '.join(early)}]" if early else ""
        out.append(
            f"- {problem.name}, {s.method.label}: {speed}; cost per iteration {cost:.2f}× best Adam's "
            f"({'meets' if cost <= 2 else 'misses'} ≤ 2×); final {problem.metric} "
            f"{s.final_elbo:.3f} vs best Adam's {best.final_elbo:.3f}."
        )
    return out


# --------------------------------------------------------------------- driver
LOADS = []


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    LOADS.append(one)
    return f"{one:.2f}/{five:.2f}/{fifteen:.2f}"


def run_problem(name, args, log=print):
    """All methods × seeds on one problem (seeds outermost, so that load drifts
    touch every method alike); returns the section's markdown and the verdict."""
    problem = make_problem(name, args.quick)
    budget = args.iterations or (QUICK_BUDGET if args.quick else BUDGET)[name]
    points = checkpoints(budget)
    chosen = methods(args.adam_lrs, args.modes, EXTRAS.get(name, ()) if args.extras else ())
    runs = {m: [] for m in chosen}
    load_before = load_average()
    started = time.perf_counter()
    for seed in range(args.seeds):
        for method in chosen:
            run = run_one(problem, method, seed, budget, points)
            runs[method].append(run)
            final = "failed" if run.failure or not run.elbo else f"{run.elbo[-1]:.3f}"
            log(
                f"{name} seed {seed} {method.label:<34} final {final:>10}  "
                f"{fmt_ms(1e3 * run.step_seconds):>6} ms/it  {run.failure or ''}",
                flush=True,
            )
    level_points = sorted({min(points, key=lambda p: abs(p - budget / f)) for f in (10, 3)})
    summaries, best, target = summarise(runs, level_points)
    minutes = (time.perf_counter() - started) / 60
    notes = [f"Load average (1/5/15 min) {load_before} before, {load_average()} after ({minutes:.1f} min)."]
    unavailable = compositional_available()
    if args.modes and unavailable:
        notes.append(f"CompositionalNG not run: `curvi.compositional` does not import ({unavailable}).")
    if name.startswith("vae"):
        notes.append(f"Decoder: {DECODER_NOTE}")
    section = problem_section(problem, budget, points, summaries, best, target, args.seeds, notes)
    if getattr(args, "runs_json", None):  # every run's evaluations, for a later look
        path = Path(args.runs_json)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = [asdict(r) for rs in runs.values() for r in rs]
        path.write_text(json.dumps(data))
    return section, verdict(problem, summaries, best, target)


def header(args, total_minutes, revision):
    threads = torch.get_num_threads()
    command = "python benchmarks/compositional.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    peak = max(LOADS, default=float("nan"))
    return (
        "# Compositional natural gradient (K-FAC) against Adam: a VAE on digits, a flow guide\n\n"
        "Set-up in the docstring of `benchmarks/compositional.py`.\n"
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({threads} thread{'s' if threads > 1 else ''}; "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}), pyro {pyro.__version__}; "
        f"{revision} (at the start of the run); {datetime.date.today().isoformat()}; float32. "
        f"Command: `{command}` "
        f"({total_minutes:.1f} min). The machine is shared: the 1-minute load average peaked at "
        f"{peak:.2f} on {os.cpu_count()} cores during the run"
        + (
            ", so times are inflated; the cost ratios, measured in the same minutes with seeds "
            "interleaved, are the part to read.\n\n"
            if peak > (os.cpu_count() or 1)
            else ".\n\n"
        )
    )


def assemble(out: Path, sections: dict[str, str], verdicts: dict[str, list[str]], head: str) -> str:
    """The results file: this run's sections, the other problems' kept from the old file,
    and the hand-written '## Reading' kept."""
    old = out.read_text() if out.exists() else ""
    blocks = []
    for name in PROBLEMS:
        if name in sections:
            blocks.append(
                f"<!-- problem: {name} -->\n## {name}\n\n{sections[name]}\n\n#### Targets\n\n"
                + "\n".join(verdicts[name])
                + f"\n<!-- end: {name} -->"
            )
        else:
            found = re.search(rf"<!-- problem: {name} -->.*?<!-- end: {name} -->", old, re.S)
            if found:
                blocks.append(found.group(0))
    reading = re.search(r"\n## Reading\n.*", old, re.S)
    return head + "\n\n".join(blocks) + "\n" + (reading.group(0) if reading else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..n-1 (default {SEEDS}; quick 2)")
    parser.add_argument("--adam-lrs", type=float, nargs="*", default=list(ADAM_LRS))
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--no-extras", dest="extras", action="store_false", help="only the modes' defaults")
    parser.add_argument("--revision", help="what to record as curvi's revision (run from an exported tree)")
    parser.add_argument("--iterations", type=int, default=None, help="budget of every problem")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, short runs; nothing written")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--runs-json", type=Path, help="also write every run's evaluations here (JSON)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else SEEDS)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    started, revision = time.perf_counter(), args.revision or curvi_revision()
    sections, verdicts = {}, {}
    for name in args.problems:
        sections[name], verdicts[name] = run_problem(name, args)
        print("\n" + sections[name] + "\n\n" + "\n".join(verdicts[name]) + "\n", flush=True)
        if not args.quick:  # written after every problem, so a long run leaves its finished parts
            text = assemble(
                args.out, sections, verdicts, header(args, (time.perf_counter() - started) / 60, revision)
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            print(f"written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
