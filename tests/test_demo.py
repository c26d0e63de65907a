import torch

from curvi.cli import main


def test_curvi_demo_prints_the_summary_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "cbpp.png"
    dtype = torch.get_default_dtype()
    assert main(["demo", "--steps", "200", "--draws", "4000", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    for name in ("(Intercept)", "period2", "period3", "period4", "herd sd", "glmmTMB (ML)"):
        assert name in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.get_default_dtype() == dtype  # the demo leaves global state alone
