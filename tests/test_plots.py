"""curvi.plots: every plot renders to a valid PNG without pyplot, the
reference overlay is a proper kernel density, negative curvature is marked,
10⁴ random effects render quickly, and bad inputs are refused by name."""

import math
import re
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from curvi import eigen
from curvi.plots import (
    _kernel_density,
    plot_caterpillar,
    plot_elbo,
    plot_marginals,
    plot_spectrum,
)

RED = to_rgba("#c44e52")


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def drawn_pixels(fig):
    """Fraction of non-white pixels of the figure rendered by the Agg canvas."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return float((rgba[..., :3] < 250).any(axis=-1).mean())


def normal_pdf(x, sd=1.0):
    return np.exp(-0.5 * (x / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


@pytest.fixture
def rng():
    return np.random.default_rng(1)


# ------------------------------------------------------------------ rendering
def test_each_plot_writes_a_png(tmp_path, rng):
    steps = np.arange(1, 1001)
    u = rng.normal(size=40)
    H = -torch.diag(torch.tensor([100.0, 4.0, 1.0, -0.5]))
    outputs = {
        "elbo": lambda out: plot_elbo(-1e3 / steps - rng.normal(0, 1, steps.size), out=out),
        "marginals": lambda out: plot_marginals(
            {"a": rng.normal(size=3000), "b": rng.gamma(2.0, size=3000)},
            reference={"a": rng.normal(size=800)},
            truth={"a": 0.0},
            out=out,
        ),
        "spectrum": lambda out: plot_spectrum(eigen(H, names=list("abcd")), labels=True, out=out),
        "caterpillar": lambda out: plot_caterpillar(u, u - 1, u + 1, out=out),
    }
    for name, draw in outputs.items():
        path = tmp_path / f"{name}.png"
        fig = draw(path)
        assert isinstance(fig, Figure)
        width, height = png_size(path)
        assert 400 <= width <= 2500 and 250 <= height <= 1500, (name, width, height)
        assert path.stat().st_size > 10_000, name
        assert drawn_pixels(fig) > 0.02, name


def test_no_pyplot_and_the_users_backend_survives(tmp_path):
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import numpy as np\n"
        "from curvi.plots import plot_elbo\n"
        f"plot_elbo(np.arange(100.0), out={str(tmp_path / 'e.png')!r})\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    png_size(tmp_path / "e.png")


def test_draws_on_a_given_axes_and_in_a_thread(tmp_path):
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    assert plot_elbo([1.0, 2.0, 3.0], ax=ax1) is fig
    assert plot_caterpillar([0.0, 1.0], [-1.0, 0.5], [1.0, 2.0], ax=ax2, out=tmp_path / "c.png") is fig
    png_size(tmp_path / "c.png")
    errors = []

    def work(i):
        try:
            plot_spectrum(np.logspace(-1, 2, 10), out=tmp_path / f"s{i}.png")
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(png_size(tmp_path / f"s{i}.png")[0] > 400 for i in range(3))


# ----------------------------------------------------------------------- ELBO
def test_elbo_running_mean_and_off_scale_note():
    values = np.concatenate([np.full(50, -1e6), np.full(950, -100.0)])
    fig = plot_elbo(values, smooth=10)
    ax = fig.axes[0]
    raw, running = ax.lines
    assert len(raw.get_xdata()) == 1000 and len(running.get_xdata()) == 991
    np.testing.assert_allclose(running.get_ydata()[-1], -100.0)
    assert ax.get_ylim()[0] > -1e3  # fitted to where the fit settled
    assert any("50 early steps below the axis" in t.get_text() for t in ax.texts)
    assert len(plot_elbo(values, smooth=0).axes[0].lines) == 1
    assert len(plot_elbo(torch.arange(10.0)).axes[0].lines) == 1  # too short for a default window


# ------------------------------------------------------------------ marginals
def test_reference_overlay_is_a_kernel_density_of_the_reference(rng):
    # a "perfect" normal sample: the n quantiles Φ⁻¹((i − ½) / n)
    n = 20_000
    reference = torch.special.ndtri((torch.arange(n) + 0.5) / n).numpy()
    fig = plot_marginals({"x": rng.normal(size=n)}, reference={"x": reference})
    (ax,) = fig.axes
    (line,) = ax.lines
    grid, kde = line.get_xdata(), line.get_ydata()
    assert np.trapezoid(kde, grid) == pytest.approx(1.0, abs=0.005)  # the panel holds 99.9 %
    # the KDE of N(0, 1) with Scott's bandwidth h = s n^(−1/5) is N(0, 1 + h²)
    h = reference.std(ddof=1) * n ** (-0.2)
    assert np.abs(kde - normal_pdf(grid, math.sqrt(1 + h * h))).max() < 1e-4
    assert np.abs(kde - normal_pdf(grid)).max() > 2e-3  # h matters at this precision
    # the draws' histogram is a density too
    (stairs,) = ax.patches
    heights, edges = stairs.get_data().values, stairs.get_data().edges
    assert (heights * np.diff(edges)).sum() == pytest.approx(1.0, abs=0.005)


def test_kernel_density_matches_scipy_exact_and_binned(rng):
    scipy_stats = pytest.importorskip("scipy.stats")
    grid = np.linspace(-5, 5, 301)
    small = rng.standard_t(5, size=2000)
    np.testing.assert_allclose(
        _kernel_density(small, grid), scipy_stats.gaussian_kde(small)(grid), atol=1e-12
    )
    large = rng.normal(size=120_000)  # the binned path
    exact = scipy_stats.gaussian_kde(large)(grid[::10])
    assert np.abs(_kernel_density(large, grid[::10]) - exact).max() < 1e-3 * exact.max()


def test_marginals_overlays_only_where_given(rng):
    draws = {"a": rng.normal(size=500), "b": rng.normal(size=500), "c": torch.randn(500)}
    fig = plot_marginals(
        draws, reference={"a": rng.normal(size=300), "unplotted": [1.0, 2.0]}, truth={"b": 0.5}, ncols=2
    )
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["a", "b", "c"]
    assert [len(ax.lines) for ax in axes] == [1, 1, 0]  # the density; the truth line; nothing
    assert axes[1].lines[0].get_xdata()[0] == 0.5
    texts = [t.get_text() for t in fig.legends[0].texts]
    assert texts == ["curvi", "NUTS (kernel density)", "truth"]
    only_b = plot_marginals(draws, names=["b"], labels=("guide", "MCMC", "simulated"), truth={"b": 0.0})
    assert [t.get_text() for t in only_b.legends[0].texts] == ["guide", "simulated"]


# ------------------------------------------------------------------- spectrum
def scatter_points(ax):
    """(y values, rgba) of every scatter point drawn."""
    ys, colours = [], []
    for coll in ax.collections:
        offsets = coll.get_offsets()
        ys.extend(offsets[:, 1])
        colours.extend([tuple(coll.get_facecolor()[0])] * len(offsets))
    return np.array(ys), colours


def test_spectrum_marks_negative_eigenvalues():
    fig = plot_spectrum(np.array([3.0, -0.2, 100.0, 0.01, -7.0]))
    ax = fig.axes[0]
    ys, colours = scatter_points(ax)
    red = np.array([c == RED for c in colours])
    assert sorted(ys[red]) == [-7.0, -0.2] and (ys[~red] > 0).all()
    assert ax.get_yscale() == "symlog"
    assert "2 negative" in ax.get_title()
    assert plot_spectrum(np.logspace(-3, 3, 30)).axes[0].get_yscale() == "log"
    assert plot_spectrum([9.0, 10.0]).axes[0].get_yscale() == "linear"  # within a decade


def test_spectrum_of_an_eigen_result_is_that_of_minus_h():
    lam = torch.tensor([-50.0, -5.0, -0.5, 2.0])  # H: one direction of upward curvature
    Q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))[0]
    H = Q @ torch.diag(lam) @ Q.T
    res = eigen(H, names=["mu", "log_sigma", "u[0]", "u[1]"])
    ax = plot_spectrum(res, labels=True).axes[0]
    ys, colours = scatter_points(ax)
    np.testing.assert_allclose(sorted(ys), [-2.0, 0.5, 5.0, 50.0], rtol=1e-10)
    assert [y for y, c in zip(ys, colours) if c == RED] == pytest.approx([-2.0])
    assert len(ax.texts) == 4  # each eigenvalue labelled by its dominant coordinate
    assert all(t.get_text().split(" ")[0] in res.names for t in ax.texts)
    # a Lanczos result: its two ends side by side, ticked with their ranks in
    # the full spectrum, the gap between them marked
    part = eigen(torch.diag(-torch.arange(1.0, 201.0)), k=2, method="lanczos")
    ax = plot_spectrum(part).axes[0]
    xs, ys = np.concatenate([c.get_offsets() for c in ax.collections]).T
    np.testing.assert_allclose(ys[np.argsort(xs)], [200.0, 199.0, 2.0, 1.0], rtol=1e-8)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "199", "200"]
    assert [t.get_text() for t in ax.texts] == ["196 not computed"]
    assert "4 of 200" in ax.get_title()
    # negate=False: an EigenResult of the precision itself
    ys, _ = scatter_points(plot_spectrum(eigen(-H), negate=False).axes[0])
    np.testing.assert_allclose(sorted(ys), [-2.0, 0.5, 5.0, 50.0], rtol=1e-10)


def test_spectrum_labels_for_plain_eigenvalues():
    ax = plot_spectrum([1.0, 10.0], labels=["small", "big"]).axes[0]
    positions = {t.get_text(): t.xy for t in ax.texts}
    assert positions == {"big": (1.0, 10.0), "small": (2.0, 1.0)}  # travel with the sort


# ---------------------------------------------------------------- caterpillar
def test_caterpillar_sorts_by_mean():
    mean = np.array([0.5, -2.0, 1.5, 0.0])
    fig = plot_caterpillar(mean, mean - 1, mean + 1, labels=["a", "b", "c", "d"])
    ax = fig.axes[0]
    dots = next(line for line in ax.lines if line.get_marker() == "o")
    np.testing.assert_array_equal(dots.get_xdata(), [-2.0, 0.0, 0.5, 1.5])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b", "d", "a", "c"]
    # intervals that exclude 0 (b and c) in the dark colour, the others light;
    # each colour one polyline, its segments broken by NaNs
    light, dark = (line for line in ax.lines if line.get_marker() != "o" and line.get_linestyle() == "-")
    assert to_rgba(dark.get_color()) < to_rgba(light.get_color())
    np.testing.assert_array_equal(dark.get_xdata(), [-3.0, -1.0, np.nan, 0.5, 2.5, np.nan])
    np.testing.assert_array_equal(light.get_xdata(), [-1.0, 1.0, np.nan, -0.5, 1.5, np.nan])
    zero = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(zero) == 1 and list(zero[0].get_xdata()) == [0, 0]
    unsorted = plot_caterpillar(mean, mean - 1, mean + 1, sort=False).axes[0]
    dots = next(line for line in unsorted.lines if line.get_marker() == "o")
    np.testing.assert_array_equal(dots.get_xdata(), mean)


def test_caterpillar_of_ten_thousand_units_is_quick(tmp_path, rng):
    u = rng.normal(size=10_000)
    plot_caterpillar(u[:10], u[:10] - 1, u[:10] + 1)  # warm up fonts and caches
    # CPU time of this process (about 0.25 s), not wall time: other jobs on a
    # shared machine do not count against it
    start = time.process_time()
    fig = plot_caterpillar(u, u - 1.5, u + 1.5, out=tmp_path / "c.png")
    seconds = time.process_time() - start
    assert seconds < 1.0, f"{seconds:.2f} s of CPU for 10 000 units"
    png_size(tmp_path / "c.png")
    dots = next(line for line in fig.axes[0].lines if line.get_marker() == "o")
    assert (np.diff(dots.get_xdata()) >= 0).all() and len(dots.get_xdata()) == 10_000


def test_caterpillar_thins_evenly_and_says_so(rng):
    u = rng.normal(size=1000)
    ax = plot_caterpillar(u, u - 1, u + 1, max_units=50).axes[0]
    dots = next(line for line in ax.lines if line.get_marker() == "o")
    assert len(dots.get_xdata()) == 50
    assert dots.get_xdata()[0] == u.min() and dots.get_xdata()[-1] == u.max()  # the extremes kept
    assert dots.get_ydata()[-1] == 999  # at their rank among all units
    assert "50 of 1000 units shown" in ax.get_title()
    assert "shown" not in plot_caterpillar(u, u - 1, u + 1, max_units=5000).axes[0].get_title()


# ----------------------------------------------------------------- bad inputs
BAD = [
    (lambda: plot_elbo([]), ValueError, "elbo is empty"),
    (lambda: plot_elbo([1.0, float("nan")]), ValueError, "elbo has 1 non-finite"),
    (lambda: plot_elbo(np.zeros((3, 2))), ValueError, "elbo must be 1-D"),
    (lambda: plot_elbo([1.0, 2.0], smooth=5), ValueError, "smooth=5 is longer than elbo"),
    (lambda: plot_elbo([1.0, 2.0], smooth=1.5), TypeError, "smooth"),
    (lambda: plot_marginals({}), ValueError, "draws is empty"),
    (lambda: plot_marginals({"a": []}), ValueError, "draws['a'] is empty"),
    (lambda: plot_marginals({"a": [1.0, math.inf]}), ValueError, "draws['a'] has 1 non-finite"),
    (lambda: plot_marginals({"a": np.ones((5, 2))}), ValueError, "draws['a'] must be 1-D"),
    (
        lambda: plot_marginals({"a": [1.0]}, names=["b"]),
        ValueError,
        "names has entries that are not in draws",
    ),
    (lambda: plot_marginals({"a": [1.0, 2.0]}, reference={"a": [1.0, 1.0]}), ValueError, "reference['a']"),
    (
        lambda: plot_marginals({"a": [1.0, 2.0]}, reference={"b": [0.0, 1.0]}),
        ValueError,
        "reference has none",
    ),
    (
        lambda: plot_marginals({"a": [1.0]}, truth={"a": float("nan")}),
        ValueError,
        "truth['a'] must be finite",
    ),
    (
        lambda: plot_marginals({"a": [1.0]}, truth={"a": [1.0, 2.0]}),
        ValueError,
        "truth['a'] must be a single",
    ),
    (lambda: plot_marginals({"a": [1.0]}, labels=("x",)), ValueError, "labels must have 2 or 3"),
    (lambda: plot_marginals({"a": [1.0]}, ncols=0), ValueError, "ncols"),
    (lambda: plot_spectrum([]), ValueError, "eigenvalues is empty"),
    (lambda: plot_spectrum([1.0, float("inf")]), ValueError, "eigenvalues has 1 non-finite"),
    (lambda: plot_spectrum([1.0, 2.0], labels=["a"]), ValueError, "labels has 1 entries for 2 eigenvalues"),
    (lambda: plot_spectrum([1.0, 2.0], labels=True), ValueError, "labels=True needs an EigenResult"),
    (lambda: plot_spectrum(eigen(-torch.eye(3)), labels=["a"]), ValueError, "names has 1 entries"),
    (lambda: plot_caterpillar([], [], []), ValueError, "mean is empty"),
    (lambda: plot_caterpillar([0.0, 1.0], [0.0], [1.0, 2.0]), ValueError, "lower has 1 entries for 2 means"),
    (lambda: plot_caterpillar([0.0], [0.0], [1.0, 2.0]), ValueError, "upper has 2 entries for 1 means"),
    (lambda: plot_caterpillar([0.0], [math.nan], [1.0]), ValueError, "lower has 1 non-finite"),
    (lambda: plot_caterpillar([0.0], [1.0], [-1.0]), ValueError, "lower is above upper for 1 unit"),
    (lambda: plot_caterpillar([0.0], [0.0], [1.0], labels=["a", "b"]), ValueError, "labels has 2 entries"),
    (lambda: plot_caterpillar([0.0], [0.0], [1.0], max_units=0), ValueError, "max_units"),
]


@pytest.mark.parametrize("call, error, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs_are_refused_by_name(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()
