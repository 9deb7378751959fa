"""Virtual ranks: EP dispatch / combine (all-to-all as explicit splits) with expert TP, and TP column / row
linears, against the single-device layers: outputs and gradients."""
import os

import numpy as np
import pytest
import mindspore as ms

import mindpangu as mp
from mindpangu.parallel.virtual import ep_moe, tp_swiglu
from conftest import ROOT, ULTRA_TINY

PRO_TINY = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "tiny.yaml")


def moe_layer(path):
    cfg = mp.load_config(path, overrides=["model.num_layers=2", "model.moe.dispatch_backend=reference",
                                          "model.moe.num_experts=16" if path == ULTRA_TINY else "seed=1"]).model
    model = mp.build_model(cfg, seed=3)
    layer = model.model.layers[1].mlp
    if layer.use_router_scale:  # a non-trivial router_scale
        layer.router_scale.set_data(ms.Tensor(np.random.default_rng(1).uniform(0.5, 1.5, (1, 16)).astype(np.float32)))
    return layer


def grads(fn, layer, x):
    params = [p for p in layer.trainable_params()]
    out, g = ms.value_and_grad(lambda inp: (fn(inp) * ms.Tensor(WEIGHT)).sum(), 0, params)(x)
    return out.asnumpy(), g[0].asnumpy(), [t.asnumpy() for t in g[1]], [p.name for p in params]


WEIGHT = np.random.default_rng(7).standard_normal((24, 128)).astype(np.float32)


@pytest.mark.parametrize("path", [ULTRA_TINY, PRO_TINY], ids=["ultra-topk", "pro-moge"])
@pytest.mark.parametrize("ep,tp", [(1, 1), (2, 1), (4, 2), (8, 1), (8, 2), (2, 2)])
def test_ep_moe_equals_single_device(path, ep, tp):
    layer = moe_layer(path)
    x = ms.Tensor(np.random.default_rng(ep * 10 + tp).standard_normal((24 if ep != 8 else 24, 128)).astype(np.float32))
    single = grads(lambda inp: layer(inp.reshape(1, 24, 128))[0].reshape(24, 128), layer, x)
    virtual = grads(lambda inp: ep_moe(layer, inp, ep, tp), layer, x)
    assert abs(single[0]) > 1e-3
    np.testing.assert_allclose(virtual[0], single[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(virtual[1], single[1], rtol=1e-4, atol=1e-5)  # d/dx
    for name, a, b in zip(single[3], virtual[2], single[2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_swiglu_equals_single_device(tp):
    cfg = mp.load_config(ULTRA_TINY, overrides=["model.num_layers=1"]).model
    mlp = mp.build_model(cfg, seed=4).model.layers[0].mlp  # the dense layer
    x = ms.Tensor(np.random.default_rng(tp).standard_normal((24, 128)).astype(np.float32))
    single = grads(lambda inp: mlp(inp), mlp, x)
    virtual = grads(lambda inp: tp_swiglu(mlp, inp, tp), mlp, x)
    np.testing.assert_allclose(virtual[0], single[0], rtol=1e-5, atol=1e-4)
    for a, b in zip(virtual[2], single[2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
