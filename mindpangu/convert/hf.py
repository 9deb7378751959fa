"""Hugging Face checkpoint directories (config.json + *.safetensors) <-> mindpangu models.

Layouts read and written (``hf_layout``):
- DeepSeek-V3 (transformers' ``DeepseekV3ForCausalLM``, ``model_type: deepseek_v3``): pre-norm, sigmoid routing
  with ``topk_method: noaux_tc`` and an ``e_score_correction_bias`` per MoE layer.
- openPangu Ultra MoE (``model_type: pangu_ultra_moe``): DeepSeek-V3 tensor names, four sandwich norms
  (``sandwich_norm: true``; ``post_attention_layernorm`` normalises the attention OUTPUT, ``pre_mlp_layernorm``
  is the pre-MLP norm), config keys under transformers' openPangu names (``num_routed_experts``,
  ``num_dense_layers``, ``attention_q_lora_dim`` ...) and the DeepSeek names vLLM reads.
- Pangu Pro MoE (``model_type: PanguProMoE``, the released name; ``PanGuMoE`` is read too): GQA q/k/v/o with biases,
  ``mlp.gate``, ``mlp.router_scale``, ``mlp.experts.J``, ``mlp.shared_expert``; MoGE with one expert per group
  (groups = num_experts_per_tok).
Per-expert tensors ``mlp.experts.J.{gate,up,down}_proj.weight`` are stacked on load into
``mlp.experts.{gate,up,down}_proj [E, ...]`` and split again on save; transformers' fused in-memory
``gate_up_proj`` is accepted too. MTP layers sit at ``model.layers.{L+J}`` in HF and ``model.mtp_layers.J`` here.
Tensors are streamed one at a time through ``safetensors_io`` (sharded directories, bf16 / fp16 / FP8), never
unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..config import ConfigError, ModelConfig, model_config_from_dict
from ..config.core import field_names
from ..config.schema import MODEL_TYPE_ALIASES
from ..fsutil import replace_dir, staging_dir
from .safetensors_io import CheckpointReader, parse_size, save_sharded

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
_ALLOWED_UNUSED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # rotary caches: recomputed from rope_theta
# the model_type values of config.json files (not the class names MODEL_TYPE_ALIASES also accepts)
HF_MODEL_TYPES = ("deepseek_v3", "pangu_ultra_moe", "openpangu_ultra_moe", "PanguProMoE", "PanGuMoE", "pangu_pro_moe")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def _one_spelling(hf: Dict[str, Any]) -> Dict[str, Any]:
    """Keep one of several spellings of a field: openPangu configs carry both transformers' names
    (``attention_q_lora_dim``) and the DeepSeek names vLLM reads (``q_lora_rank``). Differing values are an error."""
    spellings = field_names(ModelConfig)
    out: Dict[str, Any] = {}
    seen: Dict[str, str] = {}
    for key, value in hf.items():
        target = spellings.get(key)
        if target is None or target not in seen:
            out[key] = value
            if target is not None:
                seen[target] = key
        elif out[seen[target]] != value:
            raise ConfigError(key, f"disagrees with '{seen[target]}' ({out[seen[target]]!r}), another spelling of "
                              "the same setting", value=value, where="config.json")
    return out


def config_from_hf(hf: Dict[str, Any], overrides: Optional[Dict[str, Any]] = None) -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig.

    ``model_type`` decides the architecture through ``MODEL_TYPE_ALIASES`` (mindpangu/config/schema.py), the one
    table of names (DeepSeek-V3's ``deepseek_v3``, openPangu's ``pangu_ultra_moe``, the released Pro MoE's
    ``PanguProMoE``, ...); an unknown or missing one is a ConfigError. RoPE defaults to interleaved pairs for the
    Ultra MoE family (transformers' DeepSeek-V3; openPangu's modeling code permutes q_pe / k_pe pairwise before
    rotate_half, and vLLM's openpangu.py defaults ``rope_interleave`` to true) and to rotate_half for Pro MoE.
    """
    hf = _one_spelling(dict(hf))
    model_type = hf.get("model_type")
    ours = MODEL_TYPE_ALIASES.get(model_type) if isinstance(model_type, str) else None
    if ours is None:
        raise ConfigError("model_type", "not a model type mindpangu reads" if model_type else "missing",
                          value=model_type, where="config.json", allowed=" | ".join(HF_MODEL_TYPES))
    out: Dict[str, Any] = {}
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if (rope.get("rope_type") or "default") != "default" or (scaling and scaling.get("type", "default") != "default"):
        raise ConfigError("rope_parameters", "only plain RoPE is supported (no YaRN / linear scaling)",
                          value=rope or scaling, where="config.json")
    if "rope_theta" in rope or "rope_theta" in hf:
        out["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta"))
    ignored_keys = set(_IGNORED_KEYS)
    if ours == "pangu_pro_moe":
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
        out["rope_interleave"] = hf.get("rope_interleave", True)
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


def fp8_block(hf: Dict[str, Any]) -> Tuple[int, int]:
    """The dequantisation block of an FP8 checkpoint's ``quantization_config`` (DeepSeek-V3: 128 x 128); (128, 128)
    when there is none. Raises ConfigError for a quantisation this reader does not decode."""
    q = hf.get("quantization_config")
    if not q:
        return (128, 128)
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError("quantization_config", "only DeepSeek-V3's block FP8 (quant_method fp8, fmt e4m3) is "
                          "read", value=q, where="config.json")
    block = q.get("weight_block_size") or [128, 128]
    return int(block[0]), int(block[1])


class LazyParams(Mapping):
    """mindpangu parameter name -> array, each produced when asked for (a per-expert stack is built then), so
    loading holds one tensor at a time beside the model."""

    def __init__(self, getters: Dict[str, Callable[[], np.ndarray]], shapes: Optional[Dict[str, tuple]] = None):
        self._getters = getters
        self.shapes = shapes or {}  # name -> shape, where known without reading

    def __getitem__(self, name: str) -> np.ndarray:
        return self._getters[name]()

    def __iter__(self):
        return iter(self._getters)

    def __len__(self) -> int:
        return len(self._getters)


def hf_to_internal(names: Iterable[str], get: Callable[[str], np.ndarray], cfg: ModelConfig) -> LazyParams:
    """Map HF tensor names to mindpangu parameter names: per-expert weights stacked into ``[E, ...]``, MTP layers
    moved to ``model.mtp_layers.J``. Every tensor is used or reported: experts beyond ``moe.num_experts`` or
    missing ones are a ValueError; the only tensors dropped are the allow-listed ones (rotary caches, the MTP
    layers' copies of the shared embedding and head); anything else the model does not have is reported by
    ``assign``. ``get(name)`` reads one HF tensor."""
    getters: Dict[str, Callable[[], np.ndarray]] = {}
    experts: Dict[Tuple[str, str], Dict[int, str]] = {}
    for key in names:
        m = _EXPERT.match(key)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = key
        elif key.endswith("mlp.experts.gate_up_proj"):  # transformers' fused in-memory layout
            prefix = key[: -len("gate_up_proj")]
            getters[prefix + "gate_proj"] = lambda k=key: np.split(get(k), 2, axis=1)[0]
            getters[prefix + "up_proj"] = lambda k=key: np.split(get(k), 2, axis=1)[1]
        elif _ALLOWED_UNUSED.search(key):
            log.info("not loaded (recomputed from the config): %s", key)
        else:
            getters[key] = lambda k=key: get(k)
    n = cfg.moe.num_experts
    for (prefix, proj), per_expert in experts.items():
        missing = sorted(set(range(n)) - set(per_expert))
        extra = sorted(j for j in per_expert if j >= n)
        if missing or extra:
            raise ValueError(f"checkpoint experts of '{prefix}.*.{proj}' do not match model.moe.num_experts ({n}): "
                             + (f"missing {missing[:8]}" if missing else f"extra {extra[:8]}"))
        getters[f"{prefix}.{proj}"] = lambda keys=[per_expert[j] for j in range(n)]: np.stack([get(k) for k in keys])
    out: Dict[str, Callable[[], np.ndarray]] = {}
    for key, getter in getters.items():
        m = _LAYER.match(key)
        if m and int(m.group(1)) >= cfg.num_layers:
            j, rest = int(m.group(1)) - cfg.num_layers, m.group(2)
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # MTP shares the main embedding and head; the HF layout stores copies
            key = f"model.mtp_layers.{j}.{rest}"
        out[key] = getter
    return LazyParams(out)


def _array(value) -> np.ndarray:
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


def internal_to_hf(params: Mapping, cfg: ModelConfig) -> LazyParams:
    """mindpangu parameter names -> HF keys (experts split per expert, MTP at ``model.layers.{L+J}`` with its
    copies of the shared embedding and head). ``params`` values are arrays or MindSpore Parameters, read only when
    an HF tensor is asked for (the last expert stack is kept, so splitting it reads it once). The DeepSeek-V3
    layout always carries ``e_score_correction_bias`` (zeros without an expert bias), because it declares
    ``topk_method: noaux_tc``, under which serving engines (vLLM) expect the tensor."""
    getters: Dict[str, Callable[[], np.ndarray]] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    last: Dict[str, np.ndarray] = {}

    def stack(key, value):
        if key not in last:
            last.clear()
            last[key] = _array(value)
        return last[key]

    for key, value in params.items():
        m = re.match(r"^model\.mtp_layers\.(\d+)\.(.*)$", key)
        hf_key = f"model.layers.{cfg.num_layers + int(m.group(1))}.{m.group(2)}" if m else key
        shape = tuple(value.shape)
        if re.search(r"mlp\.experts\.(gate_proj|up_proj|down_proj)$", key):
            base, proj = hf_key.rsplit(".", 1)
            for j in range(shape[0]):
                name = f"{base}.{j}.{proj}.weight"
                getters[name] = lambda k=key, v=value, j=j: stack(k, v)[j]
                shapes[name] = shape[1:]
            continue
        getters[hf_key], shapes[hf_key] = (lambda v=value: _array(v)), shape
    for j in range(cfg.num_mtp_layers):  # HF MTP layers carry their own copies of the shared tables
        layer = cfg.num_layers + j
        head = "lm_head.weight" if "lm_head.weight" in getters else "model.embed_tokens.weight"
        for name, source in ((f"model.layers.{layer}.embed_tokens.weight", "model.embed_tokens.weight"),
                             (f"model.layers.{layer}.shared_head.head.weight", head)):
            getters[name], shapes[name] = getters[source], shapes[source]
    if hf_layout(cfg) == "deepseek_v3" and not cfg.moe.balance_loss.expert_bias.enabled:
        for name in [n for n in getters if n.endswith("mlp.gate.weight")]:
            bias = name[: -len("weight")] + "e_score_correction_bias"
            getters[bias] = lambda: np.zeros(cfg.moe.num_experts, np.float32)
            shapes[bias] = (cfg.moe.num_experts,)
    return LazyParams(getters, shapes)


def hf_layout(cfg: ModelConfig) -> str:
    """The Hugging Face layout ``cfg`` is written in: deepseek_v3 (Ultra MoE, pre_ln), openpangu (Ultra MoE,
    sandwich norms) or pangu_pro_moe. Raises ValueError when no released layout holds the config."""
    m = cfg.moe
    if cfg.type == "pangu_ultra_moe":
        return "deepseek_v3" if cfg.norm_layout == "pre_ln" else "openpangu"
    if cfg.norm_layout == "pre_ln" and m.router == "moge" and m.num_groups == m.num_experts_per_tok \
            and not cfg.num_mtp_layers:
        return "pangu_pro_moe"
    raise ValueError(f"no Hugging Face layout for this {cfg.type} config (the Pro MoE layout needs pre_ln, MoGE "
                     "with one expert per group and no MTP)")


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> Dict[str, Any]:
    """The config.json of ``cfg``'s layout (``hf_layout``), with every key the released configs carry and the
    ones serving engines read (vLLM: ``scoring_func``, ``topk_method``, ``router_enable_expert_bias``,
    ``rope_interleave``; openPangu also under the DeepSeek names vLLM's openpangu.py reads)."""
    m = cfg.moe
    layout = hf_layout(cfg)
    common = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_attention_heads, "hidden_act": "silu",
              "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
              "rope_theta": cfg.rope_theta, "rope_interleave": cfg.rope_interleave,
              "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": 0.02, "use_cache": True,
              "attention_dropout": 0.0, "torch_dtype": dtype}
    if layout == "pangu_pro_moe":
        return {"architectures": ["PanguProMoEForCausalLM"], "model_type": "PanguProMoE", **common,
                "num_key_value_heads": cfg.num_key_value_heads or cfg.num_attention_heads,
                "head_dim": cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads,
                "moe_intermediate_size": m.intermediate_size,
                "shared_expert_intermediate_size": m.shared_expert_intermediate_size
                or m.num_shared_experts * m.intermediate_size,
                "num_experts": m.num_experts, "num_experts_per_tok": m.num_experts_per_tok,
                "output_router_logits": False, "router_aux_loss_coef": m.balance_loss.coeff}
    deepseek = {"num_key_value_heads": cfg.num_attention_heads, "n_shared_experts": m.num_shared_experts,
                "n_routed_experts": m.num_experts, "num_experts_per_tok": m.num_experts_per_tok,
                "moe_intermediate_size": m.intermediate_size, "routed_scaling_factor": m.routed_scaling_factor,
                "scoring_func": "sigmoid", "norm_topk_prob": m.norm_topk_prob, "n_group": 1, "topk_group": 1,
                "first_k_dense_replace": cfg.first_k_dense_replace, "moe_layer_freq": 1, "ep_size": 1,
                "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
                "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
                "v_head_dim": cfg.v_head_dim, "num_nextn_predict_layers": cfg.num_mtp_layers,
                "attention_bias": cfg.attention_bias, "rope_scaling": None}
    if layout == "deepseek_v3":
        return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **common, **deepseek,
                "topk_method": "noaux_tc", "aux_loss_alpha": m.balance_loss.coeff, "seq_aux": False,
                "pretraining_tp": 1}
    return {"architectures": ["PanguUltraMoEForCausalLM"], "model_type": "pangu_ultra_moe", **common, **deepseek,
            # transformers' openPangu configuration names
            "num_mtp_layers": cfg.num_mtp_layers, "num_shared_experts": m.num_shared_experts,
            "num_routed_experts": m.num_experts, "attention_kv_lora_dim": cfg.kv_lora_rank,
            "attention_q_lora_dim": cfg.q_lora_rank, "attention_qk_rope_dim": cfg.qk_rope_head_dim,
            "attention_qk_dim": cfg.qk_nope_head_dim, "attention_v_dim": cfg.v_head_dim,
            "num_dense_layers": cfg.first_k_dense_replace, "sandwich_norm": True,
            "router_enable_expert_bias": m.balance_loss.expert_bias.enabled,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}


def load_hf_directory(path: str, overrides: Optional[Dict[str, Any]] = None) -> Tuple[ModelConfig, LazyParams]:
    """(ModelConfig, {mindpangu name: array, read on demand}) from a Hugging Face checkpoint directory: one or
    several ``*.safetensors`` files or ``model.safetensors.index.json`` shards; float32, float16, bfloat16 or
    DeepSeek-V3's block FP8 (dequantised to float32 as each tensor is read)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"'{path}' is not a Hugging Face checkpoint directory: no config.json")
    with open(cfg_path, encoding="utf-8") as fh:
        try:
            hf = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{cfg_path}' is not valid JSON: {e}") from None
    cfg = config_from_hf(hf, overrides)
    reader = CheckpointReader(path, fp8_block(hf))
    names = reader.names()
    if cfg.num_mtp_layers:
        layers = {int(m.group(1)) for k in names for m in [_LAYER.match(k)] if m}
        present = len([i for i in layers if i >= cfg.num_layers])
        if present < cfg.num_mtp_layers:
            log.warning("config.json declares %d MTP layer(s) but the checkpoint holds %d; loading without the "
                        "missing ones", cfg.num_mtp_layers, present)
            cfg.num_mtp_layers = present
    biases = [k for k in names if k.endswith("e_score_correction_bias")]
    if any(np.any(reader.get(k) != 0) for k in biases):
        cfg.moe.balance_loss.expert_bias.enabled = True  # the checkpoint routes with a learned expert bias
    else:  # all zero (the DeepSeek-V3 layout's placeholder): routing without a bias is the same
        names = [k for k in names if not k.endswith("e_score_correction_bias")]
    return cfg, hf_to_internal(names, reader.get, cfg)


def check_names(expected: Iterable[str], params: Mapping, source: str) -> None:
    """ValueError naming the missing and unexpected tensors when ``params`` does not hold exactly ``expected``."""
    expected = set(expected)
    missing = sorted(expected - set(params))
    unexpected = sorted(set(params) - expected)
    if missing or unexpected:
        raise ValueError(f"weights in '{source}' do not match the model: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}; unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")


def check_shape(name: str, value, expected: Tuple[int, ...], source: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"'{name}' in '{source}' has shape {tuple(value.shape)}, the model expects {tuple(expected)}")


def assign(model, params: Mapping, source: str) -> None:
    """Copy ``params`` (arrays, or a LazyParams read one at a time) into ``model``; every parameter must be given
    once with the right shape."""
    from mindspore import Tensor

    own = {p.name: p for p in model.get_parameters()}
    check_names(own, params, source)
    for name, p in own.items():
        value = params[name]
        check_shape(name, value, p.shape, source)
        p.set_data(Tensor(np.ascontiguousarray(value, dtype=np.float32)))


def from_pretrained(path: str, overrides: Optional[Dict[str, Any]] = None):
    """Build a mindpangu model from a Hugging Face checkpoint directory (tensors streamed in one at a time)."""
    from ..models import build_model

    cfg, params = load_hf_directory(path, overrides)
    model = build_model(cfg, init=False)
    assign(model, params, path)
    return model


def save_hf_directory(model, cfg: ModelConfig, path: str, dtype: str = "float32",
                      max_shard_size: str = "5GB") -> List[str]:
    """Write config.json + safetensors (one file, or shards of at most ``max_shard_size`` with
    model.safetensors.index.json) in ``dtype`` (float32, float16, bfloat16), tensor by tensor, atomically (a temp
    directory renamed into place; removed if anything fails). ``model`` is a model or a mapping of its parameter
    names to arrays (a loaded checkpoint: no model needs to be built). Returns the safetensors file names."""
    params = model if isinstance(model, Mapping) else {p.name: p for p in model.get_parameters()}
    hf = internal_to_hf(params, cfg)
    config = config_to_hf(cfg, dtype)
    limit = parse_size(max_shard_size)
    tmp = staging_dir(path)
    try:
        files = save_sharded([(n, hf.shapes[n]) for n in hf], hf.__getitem__, tmp, dtype, limit)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)
    return files
