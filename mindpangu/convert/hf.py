"""Hugging Face checkpoint directories (config.json + *.safetensors) <-> mindpangu models.

Layouts read and written:
- DeepSeek-V3 (transformers' ``DeepseekV3ForCausalLM``): pre-norm, ``model_type: deepseek_v3``.
- Pangu Pro MoE (``model_type: PanGuMoE``): GQA q/k/v/o with biases, ``mlp.gate``, ``mlp.router_scale``,
  ``mlp.experts.J``, ``mlp.shared_expert``; MoGE with one expert per group (groups = num_experts_per_tok).
- openPangu Ultra MoE: DeepSeek-V3 names with renamed config keys (``num_routed_experts``, ``num_dense_layers``,
  ``attention_q_lora_dim`` ...) and four sandwich norms (``sandwich_norm: true``); there
  ``post_attention_layernorm`` normalises the attention OUTPUT and ``pre_mlp_layernorm`` is the pre-MLP norm.
Per-expert tensors ``mlp.experts.J.{gate,up,down}_proj.weight`` are stacked on load into
``mlp.experts.{gate,up,down}_proj [E, ...]`` and split again on save; transformers' fused in-memory
``gate_up_proj`` is accepted too. MTP layers sit at ``model.layers.{L+J}`` in HF and ``model.mtp_layers.J`` here.
Weights are read through safetensors only (never pickle).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..config import ConfigError, ModelConfig, model_config_from_dict
from ..fsutil import replace_dir, staging_dir

log = logging.getLogger(__name__)

# HF config keys that carry nothing for the model math (or are derived); dropped on import.
_IGNORED_KEYS = {
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
    "initializer_range", "output_router_logits", "pretraining_tp", "transformers_version", "use_cache",
    "auto_map", "_name_or_path", "rope_scaling", "rope_parameters", "rope_theta", "sandwich_norm", "ep_size",
    "moe_layer_freq", "topk_method", "aux_loss_alpha", "seq_aux", "router_enable_expert_bias",
    "quantization_config", "model_type", "hidden_act", "rope_interleave", "num_nextn_predict_layers",
    "num_mtp_layers", "scoring_func", "sliding_window", "use_sliding_window", "max_window_layers",
}
# MLA configs carry GQA-style fields that are nominal (num_key_value_heads = heads) or derived.
_IGNORED_MLA_KEYS = {"qk_head_dim", "num_key_value_heads", "head_dim"}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def config_from_hf(hf: Dict[str, Any], overrides: Optional[Dict[str, Any]] = None) -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig."""
    hf = dict(hf)
    model_type = hf.get("model_type", "")
    out: Dict[str, Any] = {}
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if (rope.get("rope_type") or "default") != "default" or (scaling and scaling.get("type", "default") != "default"):
        raise ConfigError("rope_parameters", "only plain RoPE is supported (no YaRN / linear scaling)",
                          value=rope or scaling, where="config.json")
    if "rope_theta" in rope or "rope_theta" in hf:
        out["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta"))
    ignored_keys = set(_IGNORED_KEYS)
    if model_type in ("PanGuMoE", "pangu_pro_moe"):
        # MoGE with one expert per group: the groups are the K chosen experts' devices.
        k = hf.get("num_experts_per_tok", 8)
        shared_i, expert_i = hf.get("shared_expert_intermediate_size"), hf.get("moe_intermediate_size")
        out.update(type="pangu_pro_moe", norm_layout="pre_ln", first_k_dense_replace=0, num_mtp_layers=0,
                   attention_bias=True, rope_interleave=hf.get("rope_interleave", False),
                   moe={"router": "moge", "num_groups": k, "score_function": "softmax", "norm_topk_prob": False,
                        "routed_scaling_factor": 1.0, "router_scale": True,
                        "num_shared_experts": shared_i // expert_i if shared_i and expert_i else 1})
    else:
        ignored_keys |= _IGNORED_MLA_KEYS
        out["type"] = "pangu_ultra_moe"
        out["norm_layout"] = "sandwich" if hf.get("sandwich_norm") else "pre_ln"
        # transformers' DeepSeek-V3 defaults to the interleaved layout; the openPangu HF port uses rotate_half.
        out["rope_interleave"] = hf.get("rope_interleave", model_type == "deepseek_v3")
        out["num_mtp_layers"] = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0))
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ConfigError("scoring_func", "the Ultra MoE layout routes with sigmoid scores",
                              value=hf["scoring_func"], where="config.json")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError("hidden_act", "only SwiGLU (silu) is supported", value=hf["hidden_act"],
                          where="config.json")
    for key, value in hf.items():
        if key not in ignored_keys:
            out[key] = value
    out.update(overrides or {})
    ignored: List[str] = []
    cfg = model_config_from_dict(out, strict=False, ignored=ignored)
    if ignored:
        log.info("config.json keys not used by mindpangu: %s", ", ".join(ignored))
    return cfg


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of every *.safetensors file in a directory, as float32 numpy arrays."""
    from safetensors.numpy import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in '{path}'")
    tensors: Dict[str, np.ndarray] = {}
    for f in files:
        try:
            for k, v in load_file(f).items():
                tensors[k] = v.astype(np.float32) if v.dtype != np.float32 else v
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file '{f}': {e}") from None
    return tensors


def hf_to_internal(tensors: Dict[str, np.ndarray], cfg: ModelConfig) -> Dict[str, np.ndarray]:
    """Rename HF keys to mindpangu parameter names and stack per-expert weights."""
    stacked: Dict[str, np.ndarray] = {}
    experts: Dict[Tuple[str, str], Dict[int, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _EXPERT.match(key)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
        elif key.endswith("mlp.experts.gate_up_proj"):  # transformers' fused in-memory layout
            prefix = key[: -len("gate_up_proj")]
            stacked[prefix + "gate_proj"], stacked[prefix + "up_proj"] = np.split(value, 2, axis=1)
        else:
            stacked[key] = value
    for (prefix, proj), per_expert in experts.items():
        n = cfg.moe.num_experts
        missing = sorted(set(range(n)) - set(per_expert))
        if missing:
            raise ValueError(f"checkpoint lacks experts {missing[:8]} of '{prefix}.*.{proj}' (expected {n})")
        stacked[f"{prefix}.{proj}"] = np.stack([per_expert[j] for j in range(n)])
    out: Dict[str, np.ndarray] = {}
    for key, value in stacked.items():
        m = _LAYER.match(key)
        if m and int(m.group(1)) >= cfg.num_layers:
            j, rest = int(m.group(1)) - cfg.num_layers, m.group(2)
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # MTP shares the main embedding and head
            key = f"model.mtp_layers.{j}.{rest}"
        out[key] = value
    return out


def internal_to_hf(params: Dict[str, np.ndarray], cfg: ModelConfig) -> Dict[str, np.ndarray]:
    """mindpangu parameter names -> HF keys, experts split per expert, MTP at model.layers.{L+J}."""
    out: Dict[str, np.ndarray] = {}
    for key, value in params.items():
        m = re.match(r"^model\.mtp_layers\.(\d+)\.(.*)$", key)
        if m:
            layer = cfg.num_layers + int(m.group(1))
            key = f"model.layers.{layer}.{m.group(2)}"
        if re.search(r"mlp\.experts\.(gate_proj|up_proj|down_proj)$", key):
            for j in range(value.shape[0]):
                out[f"{key.rsplit('.', 1)[0]}.{j}.{key.rsplit('.', 1)[1]}.weight"] = np.ascontiguousarray(value[j])
            continue
        out[key] = np.ascontiguousarray(value)
    if cfg.num_mtp_layers:
        for j in range(cfg.num_mtp_layers):  # HF MTP layers carry their own copies of the shared tables
            layer = cfg.num_layers + j
            out[f"model.layers.{layer}.embed_tokens.weight"] = out["model.embed_tokens.weight"]
            head = out.get("lm_head.weight", out["model.embed_tokens.weight"])
            out[f"model.layers.{layer}.shared_head.head.weight"] = head
    return out


def config_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
    """A config.json for the layout that matches ``cfg``: DeepSeek-V3 (pre_ln) or openPangu (sandwich)."""
    m = cfg.moe
    if cfg.type == "pangu_ultra_moe" and cfg.norm_layout == "pre_ln":
        return {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "moe_intermediate_size": m.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_attention_heads,
            "n_shared_experts": m.num_shared_experts, "n_routed_experts": m.num_experts,
            "num_experts_per_tok": m.num_experts_per_tok, "routed_scaling_factor": m.routed_scaling_factor,
            "n_group": 1, "topk_group": 1, "norm_topk_prob": m.norm_topk_prob,
            "first_k_dense_replace": cfg.first_k_dense_replace, "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_interleave": cfg.rope_interleave,
            "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
            "attention_bias": cfg.attention_bias, "num_nextn_predict_layers": cfg.num_mtp_layers,
            "hidden_act": "silu", "torch_dtype": "float32",
        }
    if cfg.type == "pangu_ultra_moe":
        return {
            "architectures": ["PanguUltraMoEForCausalLM"], "model_type": "pangu_ultra_moe",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "moe_intermediate_size": m.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_mtp_layers": cfg.num_mtp_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_attention_heads, "num_shared_experts": m.num_shared_experts,
            "num_routed_experts": m.num_experts, "num_experts_per_tok": m.num_experts_per_tok,
            "routed_scaling_factor": m.routed_scaling_factor, "attention_kv_lora_dim": cfg.kv_lora_rank,
            "attention_q_lora_dim": cfg.q_lora_rank, "attention_qk_rope_dim": cfg.qk_rope_head_dim,
            "attention_qk_dim": cfg.qk_nope_head_dim, "attention_v_dim": cfg.v_head_dim,
            "num_dense_layers": cfg.first_k_dense_replace, "norm_topk_prob": m.norm_topk_prob,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_interleave": cfg.rope_interleave,
            "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
            "sandwich_norm": True, "hidden_act": "silu", "torch_dtype": "float32",
        }
    if cfg.type == "pangu_pro_moe" and cfg.norm_layout == "pre_ln" and m.router == "moge" \
            and m.num_groups == m.num_experts_per_tok and not cfg.num_mtp_layers:
        return {
            "architectures": ["PanguProMoEForCausalLM"], "model_type": "PanGuMoE",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads or cfg.num_attention_heads,
            "head_dim": cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads,
            "moe_intermediate_size": m.intermediate_size,
            "shared_expert_intermediate_size": m.shared_expert_intermediate_size
            or m.num_shared_experts * m.intermediate_size,
            "num_experts": m.num_experts, "num_experts_per_tok": m.num_experts_per_tok,
            "router_aux_loss_coef": m.balance_loss.coeff, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "rope_interleave": cfg.rope_interleave,
            "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
            "hidden_act": "silu", "torch_dtype": "float32",
        }
    raise ValueError(f"no Hugging Face layout for this {cfg.type} config (the Pro MoE layout needs pre_ln, MoGE "
                     "with one expert per group and no MTP)")


def _mtp_present(tensors: Dict[str, np.ndarray], num_layers: int) -> int:
    layers = {int(m.group(1)) for k in tensors for m in [_LAYER.match(k)] if m}
    return len([i for i in layers if i >= num_layers])


def load_hf_directory(path: str, overrides: Optional[Dict[str, Any]] = None):
    """(ModelConfig, {mindpangu name: array}) from a Hugging Face checkpoint directory."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"'{path}' is not a Hugging Face checkpoint directory: no config.json")
    with open(cfg_path, encoding="utf-8") as fh:
        try:
            hf = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{cfg_path}' is not valid JSON: {e}") from None
    tensors = read_safetensors(path)
    cfg = config_from_hf(hf, overrides)
    if cfg.num_mtp_layers:
        present = _mtp_present(tensors, cfg.num_layers)
        if present < cfg.num_mtp_layers:
            log.warning("config.json declares %d MTP layer(s) but the checkpoint holds %d; loading without the "
                        "missing ones", cfg.num_mtp_layers, present)
            cfg.num_mtp_layers = present
    biases = [v for k, v in tensors.items() if k.endswith("e_score_correction_bias")]
    if any(np.any(b != 0) for b in biases):
        cfg.moe.balance_loss.expert_bias.enabled = True  # the checkpoint routes with a learned expert bias
    elif biases:
        tensors = {k: v for k, v in tensors.items() if not k.endswith("e_score_correction_bias")}
    return cfg, hf_to_internal(tensors, cfg)


def assign(model, params: Dict[str, np.ndarray], source: str) -> None:
    """Copy ``params`` into ``model``; every parameter must be given once with the right shape."""
    from mindspore import Tensor

    own = {p.name: p for p in model.get_parameters()}
    missing = sorted(set(own) - set(params))
    unexpected = sorted(set(params) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights in '{source}' do not match the model: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}; unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    for name, p in own.items():
        value = params[name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"'{name}' in '{source}' has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(p.shape)}")
        p.set_data(Tensor(np.ascontiguousarray(value, dtype=np.float32)))


def from_pretrained(path: str, overrides: Optional[Dict[str, Any]] = None):
    """Build a mindpangu model from a Hugging Face checkpoint directory."""
    from ..models import build_model

    cfg, params = load_hf_directory(path, overrides)
    model = build_model(cfg, init=False)
    assign(model, params, path)
    return model


def save_hf_directory(model, cfg: ModelConfig, path: str) -> None:
    """Write config.json + model.safetensors (atomically: a temp directory renamed into place)."""
    from safetensors.numpy import save_file

    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    tmp = staging_dir(path)
    save_file(internal_to_hf(params, cfg), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config_to_hf(cfg), fh, indent=2)
    replace_dir(tmp, path)
