"""`soniq demo digits --quick` runs end to end and writes its JSON and PNG."""
import json

import pytest

pytest.importorskip("sklearn", reason="the digits demo needs scikit-learn (pip install 'soniq[demo]')")
pytest.importorskip("matplotlib", reason="the digits demo needs matplotlib (pip install 'soniq[demo]')")


def test_demo_digits_quick(tmp_path, capsys):
    from soniq.demos.digits import main

    assert main(seeds=1, quick=True, out_dir=str(tmp_path), peer=False) == 0
    res = json.loads((tmp_path / "digits_results.json").read_text())
    assert (tmp_path / "digits_results.png").stat().st_size > 1000
    m = res["methods"]
    assert m["soniq"]["avg_w_bits"] <= 2.0 + 1e-6 and m["soniq"]["avg_a_bits"] <= 4.0 + 1e-6
    assert m["soniq"]["accs"] == m["soniq_packed"]["accs"]  # fake-quantized == packed model
    for k in ("fp32", "soniq", "uniform_lsq_qat", "ptq"):
        assert 10.0 < m[k]["acc_mean"] <= 100.0
    assert "SONIQ" in capsys.readouterr().out


def test_validation_split_comes_from_the_training_split():
    import torch

    from soniq.demos.digits import load_data

    Xtr, ytr, Xte, yte = load_data()
    Xt2, yt2, Xva, yva = load_data(val=True)
    assert (len(Xt2), len(Xva)) == (1010, 337) and len(Xtr) == 1347
    rows = lambda X: sorted(tuple(r.flatten().tolist()) for r in X)  # noqa: E731
    assert rows(torch.cat([Xt2, Xva])) == rows(Xtr)  # the two parts are the training split, test unused
    assert torch.bincount(yva, minlength=10).min() >= 30  # stratified: every class held out
