"""No data lost (issue 7.7): soniq.save writes a temp file and renames it over the target,
so an interrupted save never leaves a half-written model in place of a good one.
"""
import os
import random
import signal
import time

import pytest
import torch

import soniq

def _model(seed: int, width: int = 256):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 16))
    cfg = soniq.qat.QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3.0, a_bits_target=6.0)
    m = soniq.qat.prepare(m, cfg)
    m(torch.randn(8, m[0].in_features, generator=torch.Generator().manual_seed(seed)))  # calibrate activations
    soniq.qat.freeze_precision(m)
    return soniq.convert(m).eval()


def _fingerprint(model, width: int = 256) -> bytes:
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x).detach().cpu().numpy().tobytes()


@pytest.fixture(scope="module")
def models():
    a, b = _model(1), _model(2)
    fa, fb = _fingerprint(a), _fingerprint(b)
    assert fa != fb
    return a, b, fa, fb


def test_round_trip(models, tmp_path):
    a, _, fa, _ = models
    soniq.save(a, tmp_path / "m.safetensors")
    assert _fingerprint(soniq.load(tmp_path / "m.safetensors")) == fa


def test_failure_before_rename_keeps_the_old_file(models, tmp_path, monkeypatch):
    a, b, fa, _ = models
    path = tmp_path / "m.safetensors"
    soniq.save(a, path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        soniq.save(b, path)
    monkeypatch.undo()
    assert path.read_bytes() == before, "save wrote into the target before renaming a complete file"
    assert _fingerprint(soniq.load(path)) == fa


def test_killed_save_leaves_old_or_new_model(models, tmp_path):
    """SIGKILL a process that keeps saving at a random moment: the file always loads as
    one of the two complete models."""
    a, b, fa, fb = models
    path = tmp_path / "m.safetensors"
    soniq.save(a, path)
    rng = random.Random(0)
    for trial in range(6):
        pid = os.fork()
        if pid == 0:  # child: save b and a over each other until killed
            try:
                while True:
                    soniq.save(b, path)
                    soniq.save(a, path)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert _fingerprint(soniq.load(path)) in (fa, fb), f"half-written file after kill (trial {trial})"
