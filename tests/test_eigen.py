"""curvi.eigen: dense and Lanczos eigenpairs against torch.linalg.eigvalsh."""

import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch

from curvi import ArrowheadHessian, ModelView, coordinate_names, eigen

matplotlib.use("Agg")


def symmetric_with_spectrum(lam, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g))
    return (Q * lam) @ Q.T


def clustered_spectrum(d=300, seed=0):
    """Random spectrum with a degenerate cluster at each end: 5.0 (×4) on top
    with 4.9 just below, −7.0 (×3) at the bottom."""
    lam = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    lam[:4], lam[4:7], lam[7] = 5.0, -7.0, 4.9
    return lam


def check_eigenpairs(H, res, tol=1e-8):
    V, lam = res.eigenvectors, res.eigenvalues
    torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1]), rtol=0, atol=1e-8)
    torch.testing.assert_close(H @ V, V * lam, rtol=0, atol=tol * H.abs().max() * 10)
    torch.testing.assert_close(
        res.residuals,
        torch.linalg.vector_norm(H @ V - V * lam, dim=0),
        rtol=1e-3,
        atol=tol * float(lam.abs().max()) * 10,
    )


def test_dense_full_spectrum():
    H = symmetric_with_spectrum(torch.randn(30))
    res = eigen(H)
    assert res.method == "dense" and res.eigenvalues.shape == (30,)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H), rtol=1e-10, atol=1e-10)
    check_eigenpairs(H, res)
    assert res.ranks.tolist() == list(range(30))


@pytest.mark.parametrize("which", ["both", "smallest", "largest"])
def test_lanczos_matches_eigvalsh_with_degenerate_clusters(which):
    lam = clustered_spectrum()
    H = symmetric_with_spectrum(lam)
    k = 5
    res = eigen(H, k=k, which=which, method="lanczos")
    ref = torch.linalg.eigvalsh(H)
    expected = {"both": torch.cat([ref[:k], ref[-k:]]), "smallest": ref[:k], "largest": ref[-k:]}[which]
    assert res.method == "lanczos" and res.converged
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-8, atol=1e-8)
    check_eigenpairs(H, res)
    if which != "smallest":  # every copy of the top cluster, then 4.9
        torch.testing.assert_close(res.eigenvalues[-5:], torch.tensor([4.9, 5.0, 5.0, 5.0, 5.0]))
    if which != "largest":
        torch.testing.assert_close(res.eigenvalues[:3], torch.full((3,), -7.0))
    d = len(lam)
    ranks = {
        "both": list(range(k)) + list(range(d - k, d)),
        "smallest": list(range(k)),
        "largest": list(range(d - k, d)),
    }[which]
    assert res.ranks.tolist() == ranks


def test_lanczos_restarts_on_a_slow_spectrum():
    lam = -(torch.linspace(1.0, 2.0, 400) ** 4)  # small relative gaps: needs restarts
    H = symmetric_with_spectrum(lam, seed=3)
    res = eigen(H, k=2, method="lanczos")
    ref = torch.linalg.eigvalsh(H)
    assert res.converged and res.num_matvecs > 60  # more than one basis of 4k + 3b vectors
    torch.testing.assert_close(res.eigenvalues, torch.cat([ref[:2], ref[-2:]]), rtol=1e-8, atol=1e-8)


def test_callable_hvp_unbatched_and_batched():
    lam = clustered_spectrum(200, seed=1)
    H = symmetric_with_spectrum(lam, seed=1)
    ref = torch.linalg.eigvalsh(H)
    calls = []

    def hvp(v):
        calls.append(v.shape)
        return H @ v

    res = eigen(hvp, k=3, dim=200)
    assert all(shape == (200,) for shape in calls)
    assert res.num_matvecs == len(calls)
    torch.testing.assert_close(res.eigenvalues, torch.cat([ref[:3], ref[-3:]]), rtol=1e-8, atol=1e-8)
    res_b = eigen(lambda V: V @ H, k=3, dim=200, batched=True)
    torch.testing.assert_close(res_b.eigenvalues, res.eigenvalues, rtol=1e-8, atol=1e-8)
    small = eigen(lambda v: 2.0 * v, dim=6)  # small: built densely from 6 products
    torch.testing.assert_close(small.eigenvalues, torch.full((6,), 2.0))


def test_arrowhead_hessian_never_densified():
    g = torch.Generator().manual_seed(0)
    p, N, k = 3, 200, 2
    A = -torch.eye(p) * 50
    B = 0.3 * torch.randn(N, k, p, generator=g)
    L = torch.randn(N, k, k, generator=g)
    D = -(L @ L.transpose(-1, -2) + torch.eye(k))
    H = ArrowheadHessian(A, B, D)
    dense = H.to_dense()
    ref = torch.linalg.eigvalsh(dense)

    class NoDense(ArrowheadHessian):
        def to_dense(self):
            raise AssertionError("the dense matrix was built")

    res = eigen(NoDense(A, B, D), k=3)  # (the 4th largest sits in a cluster 1e-4 wide)
    assert res.method == "lanczos" and res.dim == p + N * k and res.converged
    torch.testing.assert_close(res.eigenvalues, torch.cat([ref[:3], ref[-3:]]), rtol=1e-8, atol=1e-8)
    check_eigenpairs(dense, res)
    small = eigen(ArrowheadHessian(A, B[:5], D[:5]))  # dense route for small problems
    torch.testing.assert_close(
        small.eigenvalues, torch.linalg.eigvalsh(ArrowheadHessian(A, B[:5], D[:5]).to_dense())
    )


def test_names_components_and_stiff_sloppy():
    H = torch.diag(torch.tensor([-9.0, -0.01, -1.0]))
    res = eigen(H, names=["a", "b", "c"])
    [(name, weight)] = res.components(0, top=1)
    assert name == "a" and abs(weight) == pytest.approx(1.0)
    assert res.stiff.abs().argmax() == 0 and res.sloppy.abs().argmax() == 1
    assert res.stiffness_order().tolist() == [0, 1, 2]  # eigenvalues ascending: -9, -1, -0.01
    assert "λ = -9" in repr(res)


def test_coordinate_names_of_a_model_view():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.HalfNormal(torch.ones(2)).to_event(1))
        with pyro.plate("groups", 3):
            pyro.sample("u", dist.Normal(mu, tau[0]))
            pyro.sample("v", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    view = ModelView(model, unit_plate="groups")
    names = coordinate_names(view)
    assert names[:3] == ["mu", "tau[0]", "tau[1]"]
    assert names[3:6] == ["u[0]", "v[0][0]", "v[0][1]"]
    assert len(names) == view.global_dim + view.num_units * view.local_dim
    H = ArrowheadHessian(-torch.eye(3), torch.zeros(3, 3, 3), -2 * torch.eye(3).expand(3, 3, 3))
    res = eigen(H, names=view)
    assert res.names == names


def test_plot():
    import matplotlib.pyplot as plt

    H = -torch.diag(torch.logspace(-2, 2, 8))
    names = [f"beta[{i}]" for i in range(8)]
    res = eigen(H, names=names)
    ax_spec, ax_comp = res.plot(top=2)
    labels = [t.get_text() for t in ax_comp.get_yticklabels()]
    assert labels[0] == "beta[7]" and "beta[0]" in labels  # stiffest first, then the sloppiest
    assert [t.get_text() for t in ax_comp.get_legend().get_texts()][0].startswith("stiff")
    assert ax_spec.get_yscale() == "symlog"
    fig, ax = plt.subplots()
    assert res.plot(ax)[1] is None
    texts = [t.get_text() for t in ax.texts]
    assert any("stiff" in t and "beta[7]" in t for t in texts)
    plt.close("all")
    lanczos = eigen(symmetric_with_spectrum(clustered_spectrum()), k=3, method="lanczos")
    lanczos.plot(top=3)  # ranks from both ends of the spectrum
    plt.close("all")


def test_not_converged_warns():
    H = symmetric_with_spectrum(-(torch.linspace(1.0, 2.0, 300) ** 4), seed=3)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = eigen(H, k=2, method="lanczos", max_matvecs=10)
    assert not res.converged


def test_errors():
    with pytest.raises(ValueError, match="square"):
        eigen(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="dim"):
        eigen(lambda v: v)
    with pytest.raises(ValueError, match="dim=5 does not match"):
        eigen(torch.eye(4), dim=5)
    with pytest.raises(ValueError, match="which"):
        eigen(torch.eye(4), which="top")
    with pytest.raises(ValueError, match="method"):
        eigen(torch.eye(4), method="arpack")
    with pytest.raises(ValueError, match="k must be"):
        eigen(torch.eye(4), k=0)
    with pytest.raises(ValueError, match="needs k"):
        eigen(torch.eye(4), method="lanczos")
    with pytest.raises(ValueError, match="names has 2 entries"):
        eigen(torch.eye(4), names=["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        eigen(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="expected shape"):
        eigen(lambda v: v[:2], dim=4, k=1, method="lanczos")
    with pytest.raises(TypeError, match="takes a"):
        eigen("H")
