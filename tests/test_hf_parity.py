"""Logit parity with a peer: transformers' DeepseekV3ForCausalLM (torch, CPU) vs mp.from_pretrained.

torch and transformers come with the ``test`` extra (``pip install -e .[test]``); .ci/run installs them.
"""
import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
import mindspore as ms

import mindpangu as mp


def _peer(rope_interleave: bool, seed: int = 0) -> DeepseekV3ForCausalLM:
    cfg = DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
        topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=32,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64,
        rope_interleave=rope_interleave, rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # O(1) weights everywhere so every path moves the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))  # exercises the biased expert selection
    return model


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_deepseek_v3_logits_match_transformers(tmp_path, rope_interleave):
    peer = _peer(rope_interleave)
    peer.save_pretrained(tmp_path)
    ids = np.random.default_rng(1).integers(0, 256, (2, 12))
    with torch.no_grad():
        expected = peer(torch.tensor(ids)).logits.numpy()
    model = mp.from_pretrained(str(tmp_path))
    assert model.config.norm_layout == "pre_ln" and model.config.rope_interleave == rope_interleave
    assert model.config.moe.balance_loss.expert_bias.enabled
    got = model(ms.Tensor(ids, ms.int32)).asnumpy()
    assert expected.std() > 0.5  # a meaningful comparison, not two near-zero tensors
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_rope_layouts_differ(tmp_path):
    """The two RoPE layouts must give different logits on the same weights (the switch is not a no-op)."""
    peer = _peer(True)
    peer.save_pretrained(tmp_path)
    ids = ms.Tensor(np.random.default_rng(1).integers(0, 256, (1, 12)), ms.int32)
    a = mp.from_pretrained(str(tmp_path))(ids).asnumpy()
    b = mp.from_pretrained(str(tmp_path), overrides={"rope_interleave": False})(ids).asnumpy()
    assert np.abs(a - b).max() > 1e-3
