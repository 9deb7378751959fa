"""MindIR export of a model that contains the C++ MoE kernels, reloaded in a new process."""
import subprocess
import sys

import numpy as np
import mindspore as ms

import mindpangu as mp
from mindpangu.export import export_mindir
from conftest import ULTRA_TINY

RELOAD = """
import json, sys, numpy as np, mindspore as ms
from mindpangu.export import load_mindir
ms.set_context(mode=ms.GRAPH_MODE)
ids = np.load(sys.argv[2])
out = load_mindir(sys.argv[1])(ms.Tensor(ids, ms.int32)).asnumpy()
np.save(sys.argv[3], out)
"""


def test_static_export_keeps_kernels_and_reloads_in_a_new_process(tmp_path):
    cfg = mp.load_config(ULTRA_TINY, overrides=["model.num_layers=2", "model.moe.dispatch_backend=cpu_kernel"]).model
    model = mp.build_model(cfg, seed=9)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        info = export_mindir(model, str(tmp_path / "ultra"), batch=2, seq=16)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert info["dispatch_backend"] == "cpu_kernel" and info["kernel_library"].endswith(".so")
    assert info["kernel_library"].encode() in open(info["path"], "rb").read()  # the absolute path is baked in
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    proc = subprocess.run([sys.executable, str(script), info["path"], str(tmp_path / "ids.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), model(ms.Tensor(ids)).asnumpy(), atol=1e-5)


def test_dynamic_request_uses_the_reference_path():
    from mindpangu.export.mindir import with_backend

    cfg = mp.load_config(ULTRA_TINY, overrides=["model.num_layers=2", "model.moe.dispatch_backend=cpu_kernel"]).model
    model = mp.build_model(cfg, seed=9)
    twin = with_backend(model, "reference")
    assert twin.model.layers[1].mlp.backend == "reference"
    ids = ms.Tensor(np.arange(24).reshape(2, 12) % cfg.vocab_size, ms.int32)
    np.testing.assert_allclose(twin(ids).asnumpy(), model(ids).asnumpy(), atol=1e-5)
