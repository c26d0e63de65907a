import torch

from curvi.cli import main


def test_curvi_demo_prints_the_summary_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "cbpp.png"
    dtype = torch.get_default_dtype()
    assert main(["demo", "--steps", "200", "--draws", "4000", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    for name in ("(Intercept)", "period2", "period3", "period4", "herd sd", "glmmTMB", "NUTS"):
        assert name in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.get_default_dtype() == dtype  # the demo leaves global state alone


def test_demo_posterior_agrees_with_nuts():
    """The amortized Laplace posterior of cbpp against a long NUTS run of the
    same model: fixed-effect means within 0.25 NUTS sd and sds within 10 %;
    the herd sd (Gaussian in its log) within 0.5 sd and 40 %."""
    from curvi.datasets import CBPP_NUTS
    from curvi.demo import FIXED_EFFECTS, run_demo

    draws = run_demo(steps=300, num_draws=20_000, out=None, progress=False)
    means, sds = CBPP_NUTS["fixed_effects_mean"], CBPP_NUTS["fixed_effects_sd"]
    for name, mean, sd in zip(FIXED_EFFECTS, means, sds):
        assert abs(draws[name].mean() - mean) < 0.25 * sd, name
        assert abs(draws[name].std() / sd - 1) < 0.10, name
    herd = draws["herd sd"]
    assert abs(herd.mean() - CBPP_NUTS["herd_sd_mean"]) < 0.5 * CBPP_NUTS["herd_sd_sd"]
    assert abs(herd.std() / CBPP_NUTS["herd_sd_sd"] - 1) < 0.40
