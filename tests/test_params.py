"""Analytic parameter counts: the published 718B / 39B, and exact agreement with built models."""
import numpy as np
import pytest

import mindpangu as mp
from conftest import ULTRA_718B, ULTRA_TINY


def test_718b_headline_counts():
    counts = mp.count_parameters(mp.load_config(ULTRA_718B).model)
    # Published: 718B total / 39B active (arXiv 2505.04519 abstract), one embedding table, MTP excluded.
    assert round(counts["total"] / 1e9) == 718
    assert round(counts["active"] / 1e9) == 39
    # The MTP layer and the input embedding are what separate the headline from everything stored.
    assert counts["all"] - counts["total"] == 153600 * 7680 + dict(
        (n.split(" ")[0], c) for n, c, _ in counts["components"])["MTP"]


@pytest.mark.parametrize("overrides", [
    [], ["model.norm_layout=pre_ln"], ["model.tie_word_embeddings=true"], ["model.num_mtp_layers=0"],
    ["model.q_lora_rank=null"], ["model.moe.num_shared_experts=0"], ["model.attention_bias=true"],
    ["model.moe.balance_loss.expert_bias.enabled=true"], ["model.first_k_dense_replace=0", "model.num_mtp_layers=2"],
])
def test_count_equals_built_model(overrides):
    cfg = mp.load_config(ULTRA_TINY, overrides=overrides).model
    built = sum(int(np.prod(p.shape)) for p in mp.build_model(cfg, init=False).get_parameters())
    assert mp.count_parameters(cfg)["all"] == built
