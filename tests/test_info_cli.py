"""soniq.info(), the `soniq` console command, and SONIQ_ISA forcing."""
import json
import os
import subprocess
import sys

import pytest

import soniq


def run(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_info_contents(capsys):
    d = soniq.info()
    printed = capsys.readouterr().out
    assert d["version"] == soniq.__version__ and d["version"] in printed
    assert d["isa"]["active"] in d["isa"]["supported"] and "scalar" in d["isa"]["supported"]
    assert d["threads"]["soniq"] >= 1 and d["compiler"]
    for word in ("compiler", "cuda", "cpu", "features", "isa", "threads"):
        assert word in printed


def test_cli_info_json_and_help():
    r = run(["-m", "soniq.cli", "info", "--json"])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["isa"]["active"] == soniq.supported_isas()[-1]
    r = run(["-m", "soniq.cli", "--help"])
    assert r.returncode == 0 and "info" in r.stdout and "demo" in r.stdout
    r = run(["-m", "soniq.cli"])
    assert r.returncode == 2


def test_cli_demo_quick_is_exact():
    r = run(["-m", "soniq.cli", "demo", "quick", "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exact"] is True


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_soniq_isa_env(isa):
    r = run(["-c", "import soniq; print(soniq.get_isa())"], {"SONIQ_ISA": isa})
    if isa in soniq.supported_isas():
        assert r.returncode == 0 and r.stdout.strip() == isa, r.stderr
    else:  # a clear Python error at import, not SIGILL
        assert r.returncode == 1 and "RuntimeError: SONIQ_ISA='%s' cannot be used" % isa in r.stderr
        assert "not supported by this CPU (missing:" in r.stderr


def test_soniq_isa_env_unknown_name():
    r = run(["-c", "import soniq"], {"SONIQ_ISA": "neon"})
    assert r.returncode == 1 and "isa must be one of scalar, avx2, avx512" in r.stderr
