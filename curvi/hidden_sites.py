"""Latent sites a guide does not own: hidden from it by ``poutine.block``.

Pyro's pattern for models with discrete latents, or for guides made of
parts, builds each guide on a blocked model::

    guide = LaplaceGuide(poutine.block(model, hide=["c"]))     # TraceEnum_ELBO sums c out
    guide = AutoGuideList(model)
    guide.append(AutoDelta(poutine.block(model, expose=["sigma"])))
    guide.append(LaplaceGuide(poutine.block(model, hide=["sigma"])))

A Pyro autoguide never evaluates the model's density, so the hidden sites do
not concern it. A Laplace guide does: its precision is the curvature of
``log p``, which depends on them. Here the guide's view of the model sees
through the blocks (:func:`without_blocks`) and treats each hidden latent
site by what it is (:class:`HiddenSites`):

* an *enumerable* discrete site is summed out of the log density with
  Pyro's enumeration machinery (``poutine.enum`` and
  :func:`pyro.ops.contract.contract_to_tensor`, as ``TraceEnum_ELBO`` and
  NUTS do), per unit when it sits in the unit plate;
* any other site is *conditioned on*: its value comes from whoever samples it
  (another part of an ``AutoGuideList``), and the guide is the Laplace
  approximation of the conditional ``p(θ, y | that value)``.

A latent site hidden inside the model's own body (a ``with poutine.block()``
there) cannot be seen at all; the view checks at set-up that the log density
is a deterministic function of the coordinates, so such a model is refused
instead of giving a random density.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import pyro.poutine as poutine
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.ops.contract import contract_to_tensor
from pyro.ops.packed import unpack
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.messenger import _bound_partial, _context_wrap
from pyro.poutine.runtime import _ENUM_ALLOCATOR
from pyro.poutine.util import site_is_subsample

__all__ = [
    "HiddenSites",
    "SummingOutELBO",
    "check_deterministic",
    "enumerated_terms",
    "particle_log_joint",
    "without_blocks",
]


def without_blocks(model: Callable) -> tuple[Callable, bool]:
    """The model with its ``poutine.block`` wrappers removed (other handlers
    kept, in order), and whether there were any.

    Usage::

        import pyro, pyro.distributions as dist
        import pyro.poutine as poutine

        def model():
            pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("mu", dist.Normal(0.0, 1.0))

        full, removed = without_blocks(poutine.block(model, hide=["c"]))
        removed, "c" in poutine.trace(full).get_trace().nodes   # True, True
    """
    inner = model.func if isinstance(model, _bound_partial) else model
    if isinstance(inner, functools.partial) and inner.func is _context_wrap and len(inner.args) == 2:
        messenger, wrapped = inner.args
        unwrapped, removed = without_blocks(wrapped)
        if isinstance(messenger, BlockMessenger):
            return unwrapped, True
        if removed:
            return messenger(unwrapped), True
    return model, False


class HiddenSites(NamedTuple):
    """The latent sites of a model its guide does not own.

    Usage::

        import pyro, pyro.distributions as dist
        import pyro.poutine as poutine

        def model():
            pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("sigma", dist.HalfNormal(1.0))
            pyro.sample("mu", dist.Normal(0.0, 1.0))

        blocked = poutine.trace(poutine.block(model, hide=["c", "sigma"])).get_trace()
        full = poutine.trace(model).get_trace()
        HiddenSites.of(full, frozenset(blocked.stochastic_nodes))   # (('c',), ('sigma',))

    :ivar tuple enumerated: enumerable discrete sites, summed out.
    :ivar tuple conditioned: other sites, whose values are given.
    """

    enumerated: tuple[str, ...]
    conditioned: tuple[str, ...]

    @staticmethod
    def of(full_trace, owned: frozenset[str]) -> HiddenSites:
        """Classify the latent sites of ``full_trace`` that are not ``owned``."""
        enumerated, conditioned = [], []
        for name, site in full_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site) or name in owned:
                continue
            fn = site["fn"]
            if fn.support.is_discrete and fn.has_enumerate_support:
                enumerated.append(name)
            else:
                conditioned.append(name)
        return HiddenSites(tuple(enumerated), tuple(conditioned))

    def __bool__(self) -> bool:
        return bool(self.enumerated or self.conditioned)

    def configure(self, model: Callable) -> Callable:
        """``model`` with the enumerated sites marked for parallel enumeration
        (whatever the model's own annotations), for Pyro's ``TraceEnum_ELBO``."""
        if not self.enumerated:
            return model
        names = frozenset(self.enumerated)

        def config(site):
            if site["name"] in names and not site["is_observed"]:
                return {"enumerate": "parallel"}
            return {}

        return poutine.infer_config(model, config)

    def enumerate(self, model: Callable, max_plate_nesting: int) -> Callable:
        """``model`` with the enumerated sites enumerated in parallel, to the
        left of its ``max_plate_nesting`` plate dims. Pyro's enumeration
        dims come from one global allocator, which a ``TraceEnum_ELBO``
        running around the guide is using: the allocator's state is kept
        and restored around each call."""
        if not self.enumerated:
            return model
        enumerated = poutine.enum(self.configure(model), first_available_dim=-max_plate_nesting - 1)

        @functools.wraps(model)
        def with_own_allocator(*args, **kwargs):
            state = {k: copy.copy(v) for k, v in vars(_ENUM_ALLOCATOR).items()}
            try:
                return enumerated(*args, **kwargs)
            finally:
                vars(_ENUM_ALLOCATOR).clear()
                vars(_ENUM_ALLOCATOR).update(state)

        return with_own_allocator


class SummingOutELBO(TraceEnum_ELBO):
    """Pyro's ``TraceEnum_ELBO`` with a guide's hidden enumerable sites summed
    out of the model whether or not the model marks them for enumeration:
    the ELBO of the density the guide's Laplace approximation is built on.
    What :func:`curvi.fit` uses by default for a Laplace guide with such
    sites (:meth:`curvi.guides.LaplaceGuideBase.default_loss`).

    Usage::

        import pyro, pyro.distributions as dist
        import pyro.poutine as poutine
        from curvi import LaplaceGuide

        def model(obs):                     # c is not marked for enumeration
            mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
            with pyro.plate("data", len(obs)):
                c = pyro.sample("c", dist.Bernoulli(0.2))
                pyro.sample("z", dist.Normal(mu * (1 - c), 1.0 + 2 * c), obs=obs)

        obs = torch.randn(6)
        guide = LaplaceGuide(poutine.block(model, hide=["c"]))
        guide(obs)
        SummingOutELBO(guide.view.hidden, max_plate_nesting=1).loss(model, guide, obs)

    :param HiddenSites hidden: the guide's hidden sites (``guide.view.hidden``).
    :param kwargs: as for :class:`~pyro.infer.TraceEnum_ELBO`.
    """

    def __init__(self, hidden: HiddenSites, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden

    def _get_traces(self, model, guide, args, kwargs):
        return super()._get_traces(self.hidden.configure(model), guide, args, kwargs)


def particle_log_joint(model_trace, particle_plate: str | None) -> torch.Tensor:
    """``log p`` of each vectorized particle of an enumerated model trace
    (from ``TraceEnum_ELBO``, log probabilities packed), the enumerated
    sites summed out: shape ``(K,)`` (``(1,)`` without a particle plate).

    Usage::

        import pyro, pyro.distributions as dist
        from pyro.infer import TraceEnum_ELBO, config_enumerate

        @config_enumerate
        def model():
            with pyro.plate("data", 3):
                c = pyro.sample("c", dist.Bernoulli(0.5))
                pyro.sample("z", dist.Normal(c, 1.0), obs=torch.zeros(3))

        def guide():
            pass

        elbo = TraceEnum_ELBO(max_plate_nesting=1)
        model_trace, _ = next(elbo._get_traces(model, guide, (), {}))
        particle_log_joint(model_trace, None)   # log Σ_c p(c, z), shape (1,)
    """
    tree = OrderedDict()
    for site in model_trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        ordinal = frozenset(
            model_trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )
        tree.setdefault(ordinal, []).append(site["packed"]["log_prob"])
    enum_symbols = set(model_trace.symbol_to_dim) - set(model_trace.plate_to_symbol.values())
    target = (
        frozenset() if particle_plate is None else frozenset([model_trace.plate_to_symbol[particle_plate]])
    )
    return contract_to_tensor(tree, enum_symbols, target_ordinal=target).reshape(-1)


def enumerated_terms(trace, unit_plate: str | None) -> dict:
    """The log density of an enumerated trace with the enumerated sites summed
    out, as :meth:`curvi.ModelView._terms` terms ``name -> (tensor, per_unit)``.

    When every term that involves an enumerated site sits in the unit plate,
    the sum is taken unit by unit: one per-unit term (the unit axis at
    ``unit_dim``) for the unit plate's sites and the other sites' terms as
    they are. Otherwise the whole density is one scalar term (the view is
    then not separable by unit).

    Usage::

        import pyro, pyro.distributions as dist
        import pyro.poutine as poutine

        def model():
            with pyro.plate("groups", 3):
                c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
                pyro.sample("z", dist.Normal(c, 1.0), obs=torch.zeros(3))

        trace = poutine.trace(poutine.enum(model, first_available_dim=-2)).get_trace()
        terms = enumerated_terms(trace, "groups")   # one per-unit term, shape (3,)
    """
    trace.compute_log_prob(site_filter=lambda name, site: not site_is_subsample(site))
    trace.pack_tensors()
    enum_symbols = set(trace.symbol_to_dim) - set(trace.plate_to_symbol.values())
    unit_symbol = trace.plate_to_symbol.get(unit_plate)
    factors = []  # (name, ordinal, packed log prob, in the unit plate)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        ordinal = frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        factors.append((name, ordinal, site["packed"]["log_prob"], unit_symbol in ordinal))

    def involves_enumeration(t):
        return bool(set(t._pyro_dims) & enum_symbols)

    enumerated_outside = any(involves_enumeration(t) and not inside for _, _, t, inside in factors)
    if unit_symbol is None or enumerated_outside:
        tree = OrderedDict()
        for _, ordinal, t, _ in factors:
            tree.setdefault(ordinal, []).append(t)
        return {"log p (enumerated sites summed out)": (contract_to_tensor(tree, enum_symbols), False)}

    terms, tree = {}, OrderedDict()
    for name, ordinal, t, inside in factors:
        if inside:
            tree.setdefault(ordinal, []).append(t)
        else:
            terms[name] = (unpack(t, trace.symbol_to_dim), False)
    per_unit = contract_to_tensor(tree, enum_symbols, target_ordinal=frozenset([unit_symbol]))
    per_unit = unpack(per_unit, trace.symbol_to_dim)  # the unit axis at its plate's dim
    terms["log p in the unit plate (enumerated sites summed out)"] = (per_unit, True)
    return terms


def check_deterministic(log_joint: Callable[[], torch.Tensor], model_name: str = "the model") -> None:
    """Raise a ``ValueError`` when ``log_joint()`` changes from one call to the
    next under other random numbers: a latent site the view cannot see (a
    ``poutine.block`` inside the model's body) is being drawn at random.

    Usage::

        check_deterministic(lambda: torch.tensor(1.0))         # passes
        try:
            check_deterministic(lambda: torch.randn(()))        # a hidden random draw
        except ValueError as error:
            print(error)
    """
    with torch.random.fork_rng():  # every device the model may draw on
        torch.manual_seed(12345)
        first = log_joint()
        torch.manual_seed(54321)
        second = log_joint()
    if not torch.equal(first, second) and not (first.isnan() and second.isnan()):
        raise ValueError(
            f"the log density of {model_name} changes between two evaluations at the same "
            f"coordinates ({float(first):.6g} then {float(second):.6g}): a latent site hidden from "
            "curvi (a poutine.block inside the model's body, say) is drawn at random. Block sites "
            "by wrapping the model, poutine.block(model, hide=[...]), which curvi sees through"
        )
