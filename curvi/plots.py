"""The four plots a statistician wants from a fit.

* :func:`plot_elbo` -- the ELBO trace of a fit, raw and as a running mean;
* :func:`plot_marginals` -- posterior marginals of the global parameters,
  with a reference posterior (e.g. NUTS) overlaid as a kernel density;
* :func:`plot_spectrum` -- the curvature spectrum (eigenvalues of the
  precision −H), negative eigenvalues, where a repair acts, marked;
* :func:`plot_caterpillar` -- the random effects of many units as
  intervals sorted by their means.

Each takes plain data (torch tensors, numpy arrays or sequences), draws on
a given ``ax`` or on a new :class:`matplotlib.figure.Figure`, writes a PNG
when given ``out=`` and returns the figure. Figures are made without
pyplot and no backend is selected, so the functions work under any backend
(a notebook's stays as it is), in scripts without a display and in threads.
A figure made here is not registered with pyplot: in a notebook, show it
by leaving it as a cell's value (with the inline backend) or write it with
``out=``.

Usage::

    import tempfile, os
    import numpy as np

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        plot_elbo(-100.0 / np.arange(1, 301) - rng.normal(0, 0.1, 300),
                  out=os.path.join(tmp, "elbo.png"))
        plot_marginals({"mu": rng.normal(0, 1, 2000)}, reference={"mu": rng.normal(0.1, 1, 500)},
                       out=os.path.join(tmp, "marginals.png"))
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .checks import check_count
from .eigen import EigenResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_caterpillar", "plot_elbo", "plot_marginals", "plot_spectrum"]

_DPI = 120
_BLUE, _ORANGE, _RED, _GREY = "#4c72b0", "#dd8452", "#c44e52", "0.45"


# ---------------------------------------------------------------- ELBO trace
def plot_elbo(
    elbo: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    ax: Axes | None = None,
    out: str | Path | None = None,
    title: str | None = None,
    smooth: int | None = None,
) -> Figure:
    """The ELBO trace of a fit: every step's estimate as a thin line, a
    running mean over it.

    When the first steps lie far below where the fit settles (the usual
    case: a fit climbs by orders of magnitude before it converges), the
    y-axis is fitted to the later steps and a note says how many early steps
    are below it, so that the noise around convergence stays readable.

    Usage::

        import numpy as np

        steps = np.arange(1, 2001)
        elbo = -1e4 / steps - 250.0 + np.random.default_rng(0).normal(0, 2, steps.size)
        fig = plot_elbo(elbo, title="toy fit")               # running mean over 40 steps
        fig = plot_elbo(elbo, smooth=0)                      # raw values only

    :param elbo: the per-step ELBO estimates, e.g. ``FitResult.elbo``.
    :param ax: matplotlib axes to draw on (default: a new figure).
    :param out: path of a PNG to write.
    :param str title: the axes' title (default ``"ELBO trace"``).
    :param int smooth: window of the trailing running mean, in steps; None
        for one fiftieth of the steps (at least 5, none below 50 steps); 0
        for no running mean.
    :returns: the figure drawn on.
    :raises ValueError: for an empty or non-finite ``elbo``, or ``smooth``
        longer than the trace.
    """
    values = _vector(elbo, "elbo")
    n = values.size
    if smooth is None:
        window = max(5, n // 50) if n >= 50 else 0
    else:
        check_count("smooth", smooth, 0)
        if smooth > n:
            raise ValueError(f"smooth={smooth} is longer than elbo ({n} steps)")
        window = smooth
    fig, ax = _figure_and_axes(ax, (7.0, 3.8))
    steps = np.arange(1, n + 1)
    ax.plot(steps, values, lw=0.6, color=_BLUE, alpha=0.55 if window > 1 else 0.9, label="per step")
    shown = [values[n // 10 :] if n >= 20 else values]
    if window > 1:
        csum = np.concatenate([[0.0], np.cumsum(values)])
        running = (csum[window:] - csum[:-window]) / window
        ax.plot(steps[window - 1 :], running, lw=1.8, color=_RED, label=f"running mean ({window} steps)")
        ax.legend(loc="lower right", fontsize=8, frameon=False)
        shown.append(running[(n - window + 1) // 10 :])
    lo = min(float(np.percentile(s, 0.5)) for s in shown)
    hi = max(float(s.max()) for s in shown)
    span = hi - lo if hi > lo else max(abs(hi) * 1e-6, 1e-12)
    below = int((values < lo - span).sum())
    if below:
        ax.set_ylim(lo - 0.15 * span, hi + 0.1 * span)
        ax.text(
            0.01,
            0.97,
            f"{below} early step{'s' if below > 1 else ''} below the axis (lowest {values.min():.4g})",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color=_GREY,
        )
    ax.set_xlim(0, n + 1)
    ax.set_xlabel("step (loss evaluation)")
    ax.set_ylabel("ELBO")
    ax.set_title("ELBO trace" if title is None else title)
    ax.grid(alpha=0.3, lw=0.5)
    return _finish(fig, out)


# ------------------------------------------------------ posterior marginals
def plot_marginals(
    draws: Mapping[str, Sequence[float] | np.ndarray | torch.Tensor],
    *,
    reference: Mapping[str, Sequence[float] | np.ndarray | torch.Tensor] | None = None,
    truth: Mapping[str, float] | None = None,
    names: Sequence[str] | None = None,
    out: str | Path | None = None,
    ncols: int = 3,
    labels: Sequence[str] = ("curvi", "NUTS"),
) -> Figure:
    """Posterior marginals of the global parameters, one panel each: the
    draws as a filled histogram, reference draws (e.g. from NUTS) overlaid
    as a Gaussian kernel density estimate (Scott's bandwidth), and optional
    vertical lines at known values (the truth of a simulation, or ML
    estimates).

    A name missing from ``reference`` or ``truth`` is drawn without that
    overlay; names in them that are not plotted are ignored. Each panel's
    x-range covers the central 99.8 % of both samples and the truth.

    Usage::

        import numpy as np

        rng = np.random.default_rng(0)
        draws = {"beta": rng.normal(0.0, 1.0, 4000), "sigma": rng.gamma(4.0, 0.25, 4000)}
        nuts = {"beta": rng.normal(0.1, 1.1, 1000)}                  # no reference for sigma
        fig = plot_marginals(draws, reference=nuts, truth={"beta": 0.0, "sigma": 1.0},
                             labels=("Laplace guide", "NUTS", "simulated"))

    :param draws: a mapping of parameter name to a 1-D sample.
    :param reference: the same names to 1-D reference samples.
    :param truth: the same names to single values.
    :param names: which parameters to plot, in order (default: all of
        ``draws``).
    :param out: path of a PNG to write.
    :param int ncols: panels per row.
    :param labels: legend entries of the draws and the reference; a third
        entry names the truth lines (default ``"truth"``).
    :returns: the new figure.
    :raises ValueError: for no draws, a name not in ``draws``, an empty,
        non-finite or not 1-D sample, a reference of fewer than two distinct
        values, a non-finite truth, or a reference or truth none of whose
        names is plotted.
    """
    if not isinstance(draws, Mapping):
        raise TypeError(f"draws must map parameter names to 1-D samples, got {type(draws).__name__}")
    names = list(draws) if names is None else list(names)
    if not names:
        raise ValueError("draws is empty: nothing to plot" if not draws else "names is empty")
    missing = [n for n in names if n not in draws]
    if missing:
        raise ValueError(f"names has entries that are not in draws: {missing}")
    check_count("ncols", ncols, 1)
    labels = list(labels)
    if len(labels) not in (2, 3):
        raise ValueError(f"labels must have 2 or 3 entries (draws, reference[, truth]), got {labels}")
    label_truth = labels[2] if len(labels) == 3 else "truth"
    samples = {n: _vector(draws[n], f"draws[{n!r}]") for n in names}
    refs = _overlay(reference, "reference", names, lambda v, arg: _vector(v, arg))
    truths = _overlay(truth, "truth", names, _scalar)

    ncols = min(ncols, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.6 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    handles = {}
    for ax, name in zip(axes, names):
        x = samples[name]
        spans = [np.quantile(x, [0.001, 0.999])]
        if name in refs:
            spans.append(np.quantile(refs[name], [0.001, 0.999]))
        if name in truths:
            spans.append(np.array([truths[name]] * 2))
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 0.5)
        lo, hi = lo - pad, hi + pad
        # density of all the draws; bins over those inside the panel
        inside = x[(x >= lo) & (x <= hi)]
        bins = min(80, max(10, len(np.histogram_bin_edges(inside, bins="auto")) - 1))
        counts, edges = np.histogram(inside, bins=bins, range=(lo, hi))
        density = counts / (x.size * np.diff(edges))
        handles["draws"] = ax.stairs(density, edges, fill=True, color=_BLUE, alpha=0.55, lw=0)
        if name in refs:
            grid = np.linspace(lo, hi, 512)
            kde = _kernel_density(refs[name], grid, name=f"reference[{name!r}]")
            ax.fill_between(grid, kde, color=_ORANGE, alpha=0.15, lw=0)
            (handles["reference"],) = ax.plot(grid, kde, color=_ORANGE, lw=2.0)
        if name in truths:
            handles["truth"] = ax.axvline(truths[name], color="black", lw=1.2, ls="--")
        ax.set_xlim(lo, hi)
        ax.set_ylim(bottom=0)
        ax.set_yticks([])
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    legend = {"draws": labels[0], "reference": labels[1] + " (kernel density)", "truth": label_truth}
    keys = [k for k in legend if k in handles]
    fig.legend(
        [handles[k] for k in keys],
        [legend[k] for k in keys],
        loc="outside upper center",
        ncols=len(keys),
        fontsize=9,
        frameon=False,
    )
    return _finish(fig, out)


def _kernel_density(
    sample: Sequence[float] | np.ndarray | torch.Tensor,
    grid: Sequence[float] | np.ndarray,
    *,
    name: str = "sample",
) -> np.ndarray:
    """A Gaussian kernel density estimate of a 1-D sample on ``grid``, with
    Scott's bandwidth h = s · n^(−1/5) (s the sample standard deviation),
    as :class:`scipy.stats.gaussian_kde` computes it by default.

    Up to 50 000 draws it sums the kernels exactly; above, it bins the
    sample linearly on a fine grid and convolves (relative error about
    1e-3 of the peak).

    Usage::

        import numpy as np

        grid = np.linspace(-4, 4, 201)
        f = _kernel_density(np.random.default_rng(0).normal(size=5000), grid)
        float(f.sum() * (grid[1] - grid[0]))             # ≈ 1

    :param name: how errors name the sample.
    :raises ValueError: for a sample of fewer than two distinct values.
    """
    x = _vector(sample, name)
    grid = _vector(grid, "grid")
    n = x.size
    sd = float(x.std(ddof=1)) if n > 1 else 0.0
    if not sd > 0:
        raise ValueError(f"{name} needs at least two distinct values for a kernel density, got {n} draws")
    h = sd * n ** (-0.2)
    norm = 1.0 / (n * h * math.sqrt(2.0 * math.pi))
    if n <= 50_000:
        out = np.zeros(grid.size)
        chunk = max(1, 2**21 // max(grid.size, 1))
        for start in range(0, n, chunk):
            z = (grid[:, None] - x[None, start : start + chunk]) / h
            out += np.exp(-0.5 * z * z).sum(axis=1)
        return out * norm
    # linear binning onto a grid of spacing h / 20, then a discrete convolution
    lo, hi = min(x.min(), grid.min()) - 6 * h, max(x.max(), grid.max()) + 6 * h
    m = min(int(math.ceil((hi - lo) / (h / 20))) + 1, 2**20)
    delta = (hi - lo) / (m - 1)
    pos = (x - lo) / delta
    left = np.floor(pos).astype(np.int64)
    frac = pos - left
    weights = np.bincount(left, 1.0 - frac, minlength=m) + np.bincount(left + 1, frac, minlength=m + 1)[:m]
    offsets = np.arange(-math.ceil(5 * h / delta), math.ceil(5 * h / delta) + 1) * delta / h
    kernel = np.exp(-0.5 * offsets**2)
    smoothed = np.convolve(weights, kernel, mode="same")
    return np.interp(grid, lo + delta * np.arange(m), smoothed) * norm


# ------------------------------------------------------- curvature spectrum
def plot_spectrum(
    eigenvalues: EigenResult | Sequence[float] | np.ndarray | torch.Tensor,
    *,
    ax: Axes | None = None,
    out: str | Path | None = None,
    labels: Sequence[str] | bool | None = None,
    title: str | None = None,
    negate: bool | None = None,
) -> Figure:
    """The curvature spectrum: the eigenvalues of the precision −H (H the
    Hessian of the log density), largest (stiffest) first, on a log axis --
    symmetric-log when some are negative. Negative eigenvalues, where the
    log density curves upwards and a repair (:mod:`curvi.repair`) must act,
    are drawn in red.

    Plain eigenvalues are taken as those of −H. An :class:`~curvi.EigenResult`
    is taken in :func:`curvi.eigen`'s convention, the eigenpairs of H itself,
    and negated; its ranks place a partial (Lanczos) spectrum in the full one.

    Usage::

        import pyro, pyro.distributions as dist
        from curvi import ModelView, eigen, structured_hessian

        def model(obs):                       # a funnel: indefinite away from its mode
            log_tau = pyro.sample("log_tau", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", len(obs)):
                u = pyro.sample("u", dist.Normal(0.0, log_tau.exp()))
                pyro.sample("y", dist.Normal(u, 1.0), obs=obs)

        view = ModelView(model, torch.tensor([2.0, -1.0, 0.5]), unit_plate="groups")
        H = structured_hessian(view, torch.tensor([-1.2]), torch.tensor([[1.0], [-1.0], [0.5]]))
        fig = plot_spectrum(eigen(H, names=view), labels=True)   # one negative, labelled
        fig = plot_spectrum(torch.logspace(-2, 3, 40))             # eigenvalues of −H

    :param eigenvalues: eigenvalues of −H, or an :class:`~curvi.EigenResult`.
    :param ax: matplotlib axes to draw on (default: a new figure).
    :param out: path of a PNG to write.
    :param labels: annotate each eigenvalue with the coordinate that
        dominates its eigenvector (with its share of the squared weight when
        below 90 %): for plain eigenvalues, one label per eigenvalue in the
        given order; for an :class:`~curvi.EigenResult`, the d coordinate
        names, or True for the result's own (``x[i]`` if it has none). With
        more than 24 eigenvalues, only 8 at either end (every k-th when
        they would crowd) and up to 8 negative ones are annotated.
    :param str title: the axes' title (default: a count of the eigenvalues
        and of the negative ones).
    :param bool negate: negate the eigenvalues before plotting (default:
        True for an :class:`~curvi.EigenResult`, False for plain values).
    :returns: the figure drawn on.
    :raises ValueError: for empty or non-finite eigenvalues, or labels of
        the wrong length.
    """
    result = eigenvalues if isinstance(eigenvalues, EigenResult) else None
    if result is not None:
        values = _vector(result.eigenvalues, "eigenvalues")
        dim = int(result.dim)
        ranks = _vector(result.ranks, "eigenvalues.ranks").astype(np.int64)
    else:
        values = _vector(eigenvalues, "eigenvalues")
        dim, ranks = values.size, None
    if negate is None:
        negate = result is not None
    if negate:
        values = -values
    m = values.size
    names = _spectrum_labels(labels, result, m)
    if ranks is None:
        order = np.argsort(-values, kind="stable")
        rank = np.empty(m, dtype=np.int64)
        rank[order] = np.arange(m)
    else:  # 0-based ranks in −H's spectrum, descending: H's ascending ones
        rank = ranks if negate else dim - 1 - ranks
        order = np.argsort(rank, kind="stable")
    # x: the position among the eigenvalues shown, in rank order; the gaps of a
    # partial spectrum are marked rather than drawn to scale, so that its two
    # ends do not collapse onto the edges of the axis
    x = np.empty(m)
    x[order] = np.arange(1, m + 1)
    negative = values < 0
    fig, ax = _figure_and_axes(ax, (7.0, 4.0))
    ax.scatter(x[~negative], values[~negative], s=22, color=_BLUE, zorder=3, label="λ > 0")
    if negative.any():
        ax.scatter(
            x[negative], values[negative], s=30, color=_RED, marker="v", zorder=3, label="λ < 0: repair acts"
        )
        ax.axhline(0.0, color=_GREY, lw=0.8)
    nonzero = np.abs(values[values != 0])
    if (values > 0).all():
        if values.max() >= 20 * values.min():
            ax.set_yscale("log")
    elif nonzero.size:  # linear within the decade below the smallest |λ|
        linthresh = 10.0 ** math.floor(math.log10(float(nonzero.min())))
        ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
    below, above = 0.06, 0.06
    if names is not None:
        _annotate_spectrum(ax, x, values, names, order, negative)
        below, above = (0.35 if negative.any() else 0.06), 0.35
    _pad_y(ax, values, below, above)
    ax.set_xlim(0.3, m + 0.7)
    shown_ranks = rank[order] + 1
    if m == dim:
        if m <= 12:
            ax.set_xticks(np.arange(1, m + 1))
    else:
        jumps = np.flatnonzero(np.diff(shown_ranks) > 1)
        for i in jumps:
            ax.axvline(i + 1.5, color=_GREY, lw=0.8, ls=":")
            ax.text(
                i + 1.5,
                0.5,
                f"{shown_ranks[i + 1] - shown_ranks[i] - 1} not computed",
                transform=ax.get_xaxis_transform(),
                rotation=90,
                ha="center",
                va="center",
                fontsize=7,
                color=_GREY,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            )
        ends = np.unique(np.r_[0, jumps, jumps + 1, m - 1])
        ticks = np.arange(m) if m <= 16 else ends
        ax.set_xticks(ticks + 1, [str(r) for r in shown_ranks[ticks]])
    ax.set_xlabel(f"rank, stiffest first (d = {dim})")
    ax.set_ylabel("eigenvalue λ of −H")
    if title is None:
        shown = f"{m}" if m == dim else f"{m} of {dim}"
        title = f"curvature spectrum: {shown} eigenvalues, {int(negative.sum())} negative"
    ax.set_title(title)
    ax.grid(alpha=0.3, lw=0.5)
    if negative.any():  # the corner a falling spectrum leaves free
        ax.legend(loc="lower left", fontsize=8, frameon=False)
    return _finish(fig, out)


def _spectrum_labels(labels, result, m):
    if labels is None or labels is False:
        return None
    if result is None:
        if labels is True:
            raise ValueError("labels=True needs an EigenResult; give one label per eigenvalue")
        labels = [str(s) for s in labels]
        if len(labels) != m:
            raise ValueError(f"labels has {len(labels)} entries for {m} eigenvalues")
        return labels
    names = result._names(None if labels is True else list(labels))  # checks the length
    vectors = result.eigenvectors.detach().cpu().double().numpy()
    shares = vectors**2 / (vectors**2).sum(axis=0, keepdims=True)
    out = []
    for j in range(vectors.shape[1]):
        i = int(shares[:, j].argmax())
        out.append(names[i] if shares[i, j] >= 0.9 else f"{names[i]} ({shares[i, j]:.0%})")
    return out


def _annotate_spectrum(ax, x, values, names, order, negative):
    m = values.size
    chosen = set(range(m))
    if m > 24:  # 8 at either end, spread out so that their labels do not collide
        stride = max(1, math.ceil(m / 45))
        ends = np.r_[np.arange(8) * stride, m - 1 - np.arange(8) * stride]
        chosen = set(order[ends]) | set(np.flatnonzero(negative)[:8])
    for j in sorted(chosen):
        above = values[j] >= 0
        ax.annotate(
            names[j],
            (x[j], values[j]),
            textcoords="offset points",
            xytext=(0, 7 if above else -7),
            rotation=90,
            ha="center",
            va="bottom" if above else "top",
            fontsize=7,
            color=_RED if negative[j] else "0.2",
        )


def _pad_y(ax, values, below, above):
    """y-limits around ``values`` with margins (fractions of the span)
    measured in the axis' own scale, so that they hold on log axes too."""
    scale = ax.yaxis.get_transform()
    lo, hi = scale.transform(np.array([values.min(), values.max()]))
    span = hi - lo if hi > lo else 1.0
    ax.set_ylim(*scale.inverted().transform(np.array([lo - below * span, hi + above * span])))


# -------------------------------------------------------- caterpillar plot
def plot_caterpillar(
    mean: Sequence[float] | np.ndarray | torch.Tensor,
    lower: Sequence[float] | np.ndarray | torch.Tensor,
    upper: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    labels: Sequence[str] | None = None,
    ax: Axes | None = None,
    out: str | Path | None = None,
    title: str | None = None,
    sort: bool = True,
    max_units: int | None = None,
) -> Figure:
    """The caterpillar plot of random effects: per unit, its interval
    (``lower`` to ``upper``, e.g. 5 % and 95 % posterior quantiles) as a
    horizontal line and its mean as a dot, sorted by mean, with a vertical
    line at 0. Intervals that exclude 0 are drawn darker.

    All intervals are one :meth:`~matplotlib.axes.Axes.hlines` collection and
    all means one marker line, so 10⁴ units render in a fraction of a
    second; ``max_units`` keeps that many, evenly spaced by rank (the
    extremes kept), and the title says so. Unit labels are shown on the
    y-axis for up to 60 units.

    Usage::

        import numpy as np

        rng = np.random.default_rng(0)
        u = rng.normal(0.0, 1.0, 500)                   # posterior means of 500 units
        fig = plot_caterpillar(u, u - 0.8, u + 0.8, max_units=100, title="herd effects")
        fig = plot_caterpillar(u[:5], u[:5] - 1, u[:5] + 1, labels=list("abcde"))

    :param mean: the units' posterior means (or medians), shape ``(N,)``.
    :param lower: lower interval ends, ``(N,)``.
    :param upper: upper interval ends, ``(N,)``.
    :param labels: N unit names.
    :param ax: matplotlib axes to draw on (default: a new figure sized to
        the number of units).
    :param out: path of a PNG to write.
    :param str title: the axes' title.
    :param bool sort: order the units by mean (else as given, bottom up).
    :param int max_units: the most units to draw.
    :returns: the figure drawn on.
    :raises ValueError: for empty, non-finite or mismatched inputs, a
        ``lower`` above ``upper``, or labels of the wrong length.
    """
    mean = _vector(mean, "mean")
    lower, upper = _vector(lower, "lower"), _vector(upper, "upper")
    n = mean.size
    for arg, v in (("lower", lower), ("upper", upper)):
        if v.size != n:
            raise ValueError(f"{arg} has {v.size} entries for {n} means")
    if labels is not None:
        labels = [str(s) for s in labels]
        if len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries for {n} means")
    bad = np.flatnonzero(lower > upper)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"lower is above upper for {bad.size} unit(s), first at index {i} "
            f"({lower[i]:.4g} > {upper[i]:.4g})"
        )
    if max_units is not None:
        check_count("max_units", max_units, 1)
    order = np.argsort(mean, kind="stable") if sort else np.arange(n)
    y = np.arange(n)  # a unit's rank (or position), also when thinned
    note = ""
    if max_units is not None and n > max_units:
        y = np.unique(np.round(np.linspace(0, n - 1, max_units)).astype(np.int64))
        order = order[y]
        note = f"{y.size} of {n} units shown, evenly spaced" + (" by rank" if sort else "")
    m = y.size
    mu, lo, hi = mean[order], lower[order], upper[order]
    few = m <= 60
    fig, ax = _figure_and_axes(ax, (6.5, float(np.clip(1.2 + 0.22 * m, 3.0, 9.0))))
    excludes = (lo > 0) | (hi < 0)
    dark, light = (0.16, 0.27, 0.48, 1.0), (0.6, 0.68, 0.82, 1.0)
    width = 1.6 if few else (0.8 if m <= 1000 else 0.4)
    # the intervals as two polylines broken by NaNs (those that exclude 0,
    # and the rest): one path each, however many units
    gap = np.full(m, np.nan)
    xs, ys = np.stack([lo, hi, gap], axis=1), np.stack([y, y, gap], axis=1)
    for keep, colour in ((~excludes, light), (excludes, dark)):
        ax.plot(xs[keep].ravel(), ys[keep].ravel(), color=colour, lw=width, solid_capstyle="butt")
    ax.plot(mu, y, "o", color="black", ms=4.0 if few else (2.0 if m <= 1000 else 1.0), mew=0)
    ax.axvline(0.0, color=_RED, lw=1.0, ls="--", zorder=0)
    ax.set_ylim(-0.7, n - 0.3) if few else ax.set_ylim(-0.01 * n, 1.01 * n)
    ax.tick_params(labelsize=8)
    if labels is not None and few:
        ax.set_yticks(y, [labels[i] for i in order], fontsize=8 if m <= 30 else 6)
    else:
        ax.set_ylabel("unit, by rank of the mean" if sort else "unit (as given)", fontsize=9)
        if few:
            ax.set_yticks(y) if m <= 15 else None
    ax.set_xlabel("effect", fontsize=9)
    ax.grid(axis="x", alpha=0.3, lw=0.5)
    key = [
        Line2D([], [], color=dark, lw=2, label="interval excludes 0"),
        Line2D([], [], color=light, lw=2, label="interval covers 0"),
        Line2D([], [], color="black", marker="o", ms=4, mew=0, ls="", label="mean"),
    ]
    ax.legend(handles=key, loc="upper left", fontsize=7, framealpha=0.85)
    head = title if title is not None else f"{n} random effects: mean and interval"
    ax.set_title(head + (f"\n({note})" if note else ""), fontsize=10)
    return _finish(fig, out)


# ------------------------------------------------------------------ helpers
def _vector(values, name):
    """``values`` as a finite 1-D float64 numpy array, or a ValueError
    naming ``name``."""
    if isinstance(values, torch.Tensor):
        array = values.detach().cpu().double().numpy()
    else:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be a 1-D array of numbers: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} non-finite value(s), first {array[bad[0]]} at index {int(bad[0])}"
        )
    return array


def _scalar(value, name):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single number, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a single number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _overlay(mapping, arg, names, convert):
    """The entries of an optional overlay mapping for the plotted names."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{arg} must map parameter names to values, got {type(mapping).__name__}")
    used = {n: convert(mapping[n], f"{arg}[{n!r}]") for n in names if n in mapping}
    if mapping and not used:
        raise ValueError(f"{arg} has none of the plotted names {names}: it has {list(mapping)}")
    return used


def _figure_and_axes(ax, size):
    if ax is not None:
        return _root_figure(ax), ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _root_figure(ax):
    try:
        return ax.get_figure(root=True)  # matplotlib >= 3.10: past any subfigure
    except TypeError:
        fig = ax.figure
        return getattr(fig, "figure", fig) or fig


def _finish(fig, out):
    if out is not None:
        fig.savefig(out, dpi=_DPI, format="png")
    return fig
