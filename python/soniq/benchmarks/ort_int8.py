"""ONNX Runtime INT8 dynamic quantization of the MiniLM encoder: the INT8 baseline the CPU
model benchmark (cpu_model.py) and the MiniLM demo's table both measure. Its own module so the
demo and the benchmark share it without importing each other."""
from __future__ import annotations

import copy
import os

import torch
from torch import nn


class _HFLastHidden(nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


def ort_int8(teacher, threads: int, workdir: str):
    """ONNX Runtime INT8 dynamic: a deepcopy of the HF encoder exported (the export must not
    touch the model the other methods run), quantize_dynamic (int8 weights, activations
    quantized per call), a session that does not spin between runs (it would steal the cores
    from the methods interleaved with it). Returns a callable on the feature dict."""
    import warnings

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = ["input_ids", "attention_mask", "token_type_ids"]
    f32, i8 = os.path.join(workdir, "minilm.onnx"), os.path.join(workdir, "minilm_int8.onnx")
    ids = torch.randint(1000, teacher.tokenizer.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_HFLastHidden(copy.deepcopy(teacher[0].auto_model)).eval(), tuple(ex[n] for n in names),
                          f32, input_names=names, output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]},
                          dynamo=False)
        quantize_dynamic(f32, i8, weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(i8, so, providers=["CPUExecutionProvider"])

    def run(feats):  # + the SentenceTransformer's mean pooling and normalization, as the others do
        h = torch.from_numpy(sess.run(None, {n: feats[n].numpy() for n in names})[0])
        m = feats["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)
    return run
