"""Config sections in mindformers' dialect (model, parallel_config, runner_config, optimizer, lr_schedule, ...).

Field names are the canonical ones; ``aliases`` list the spellings that Hugging Face, Megatron, mindformers and
openPangu users bring. Every field says what it means where it is declared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from .core import ConfigError, Section, option

MODEL_TYPES = ("pangu_ultra_moe", "pangu_pro_moe")
# Class and model_type names users bring from mindformers YAML or HF config.json.
MODEL_TYPE_ALIASES = {
    "PanguUltraMoEForCausalLM": "pangu_ultra_moe", "PanguUltraMoE": "pangu_ultra_moe",
    "pangu_ultra_moe": "pangu_ultra_moe", "openpangu_ultra_moe": "pangu_ultra_moe",
    "deepseek_v3": "pangu_ultra_moe", "DeepseekV3ForCausalLM": "pangu_ultra_moe",
    "PanguProMoEForCausalLM": "pangu_pro_moe", "PanguProMoE": "pangu_pro_moe", "pangu_pro_moe": "pangu_pro_moe",
    "PanGuMoE": "pangu_pro_moe", "PanguProMoEModel": "pangu_pro_moe",
}


def _fail(path: str, key: str, problem: str, origins: Dict[str, str], value=None, allowed: str = ""):
    full = f"{path}.{key}" if path else key
    kwargs = {"value": value} if value is not None else {}
    raise ConfigError(full, problem, where=origins.get(full, origins.get(path, "")), allowed=allowed, **kwargs)


@dataclass
class ExpertBiasConfig(Section):
    enabled: bool = option(False, "Aux-loss-free balancing (DeepSeek-V3 style): a per-expert bias added to the "
                                  "scores for top-k selection only, updated outside autodiff.")
    update_rate: float = option(1e-3, "Bias step per update: bias += rate * sign(mean_load - load).", ge=0.0,
                                aliases=("moe_router_bias_update_rate", "topk_bias_update_rate"))


@dataclass
class BalanceLossConfig(Section):
    type: str = option("micro_batch", "Where the f_i (and p_i) statistics of alpha*sum(f_i*p_i) are pooled: "
                                      "micro_batch (Switch), ep_group (Pangu Ultra MoE: pooled over the "
                                      "expert-parallel group), global_batch (pooled over gradient-accumulation "
                                      "micro-batches), or none.",
                       choices=("micro_batch", "ep_group", "global_batch", "none"))
    coeff: float = option(1e-2, "alpha, the loss weight (Pangu Ultra MoE reports 1e-2 best).", ge=0.0,
                          aliases=("moe_aux_loss_coeff", "aux_loss_factor", "router_aux_loss_coef"))
    z_loss_coeff: float = option(0.0, "Router z-loss weight (mean of logsumexp(logits)^2); 0 disables it.",
                                 ge=0.0, aliases=("moe_z_loss_coeff", "z_loss_factor"))
    expert_bias: ExpertBiasConfig = option(ExpertBiasConfig(), "Aux-loss-free expert bias (a control).")
    moge_probs: str = option("global", "MoGE only: the p_i of the loss. global: the global softmax over all "
                                       "experts, one loss over all experts (Pangu Pro MoE §2.2). group: p_i "
                                       "renormalised within each expert group and the loss averaged over the "
                                       "groups (the local variant the paper finds inferior).",
                             choices=("global", "group"))


@dataclass
class MoEConfig(Section):
    num_experts: int = option(8, "Routed experts per MoE layer.", ge=1,
                              aliases=("n_routed_experts", "num_routed_experts", "expert_num", "num_moe_experts",
                                       "num_local_experts"))
    num_experts_per_tok: int = option(2, "Experts each token is routed to (K).", ge=1,
                                      aliases=("top_k", "moe_router_topk", "num_experts_chosen"))
    intermediate_size: int = option(64, "SwiGLU intermediate size of one routed expert.", ge=1,
                                    aliases=("moe_intermediate_size", "moe_ffn_hidden_size"))
    num_shared_experts: int = option(1, "Shared experts, stored as one merged SwiGLU.", ge=0,
                                     aliases=("n_shared_experts", "shared_expert_num"))
    shared_expert_intermediate_size: Optional[int] = option(
        None, "Intermediate size of the merged shared expert; default num_shared_experts * intermediate_size.",
        ge=1)
    router: str = option("topk", "topk: plain top-K over all experts (Ultra MoE). moge: Mixture of Grouped "
                                 "Experts, top-K' = K/num_groups in each of num_groups contiguous groups (Pro MoE).",
                         choices=("topk", "moge"))
    score_function: str = option("sigmoid", "Router score: sigmoid (Ultra MoE) or softmax over all experts "
                                            "(Pro MoE), always computed in float32.",
                                 choices=("sigmoid", "softmax"), aliases=("scoring_func", "moe_router_score_function"))
    num_groups: int = option(1, "Expert groups: MoGE groups (one per device), or 1 for plain top-k.", ge=1,
                             aliases=("n_group", "moe_router_num_groups"))
    topk_group: int = option(1, "DeepSeek group-limited routing: groups kept per token. Only 1 group of 1 is "
                                "supported for topk routing (Ultra MoE routes over all experts).", ge=1,
                             aliases=("moe_router_group_topk",))
    norm_topk_prob: bool = option(True, "Renormalise the chosen K weights to sum to 1 (Ultra MoE yes, Pro MoE no).")
    routed_scaling_factor: float = option(1.0, "Multiplier on the routed output (Ultra MoE 2.5).", gt=0.0,
                                          aliases=("moe_router_topk_scaling_factor",))
    router_scale: bool = option(False, "Learned per-expert scale [1, num_experts] on the chosen weights, "
                                       "initialised to 1 (Pro MoE's router_scale).")
    dispatch_backend: str = option("auto", "Gating and token dispatcher implementation (mindpangu/moe/"
                                           "token_dispatcher.py). reference: composite MindSpore ops into "
                                           "expert-segment blocks (static shapes, dropless, any device). "
                                           "cpu_kernel: the same layout from the C++ aot kernels of ops/cpu (CPU). "
                                           "expert_major: an [experts, tokens, hidden] buffer whose expert axis "
                                           "semi-auto parallel shards over EP (what parallel layouts need). "
                                           "ascend: Megatron's all-to-all dispatch from MindSpore's fused "
                                           "Ascend ops (moe_token_permute, GroupedMatmul over ragged expert "
                                           "segments, moe_token_unpermute; AlltoAllV over EP inside a Morph), "
                                           "TopK gating, and for MoGE the Ascend C MogeGating op of "
                                           "ops/ascendc (Ascend only). "
                                           "auto: expert_major under semi-auto parallel, else cpu_kernel on CPU "
                                           "when it builds, else reference.",
                                   choices=("auto", "reference", "cpu_kernel", "expert_major", "ascend"))
    dispatch_block_size: int = option(0, "Rows per expert block of the reference dispatcher; 0 picks it from the "
                                         "token count. Dynamic-shape graphs (serving export) need a fixed size.",
                                      ge=0)
    balance_loss: BalanceLossConfig = option(BalanceLossConfig(), "Load-balancing loss.")
    capacity_factor: Optional[float] = option(
        None, "null: dropless (the default; both papers train dropless). A number: drop-and-pad with Megatron's "
              "capacity = ceil(T * K * capacity_factor / num_experts) (T tokens of the micro-batch the layer sees); "
              "each expert keeps its capacity routed tokens with the largest routing weight (Megatron's "
              "moe_token_drop_policy=probs) and a dropped token's weight for that expert becomes 0.",
        gt=0.0, aliases=("moe_expert_capacity_factor",))

    @property
    def uses_moge_gating_op(self) -> bool:
        """Whether routing picks the experts with the Ascend C MogeGating op: the 'ascend' dispatch of a MoGE router
        without an expert bias (the op has no bias input)."""
        return self.dispatch_backend == "ascend" and self.router == "moge" and not self.balance_loss.expert_bias.enabled

    def validate(self, path, origins):
        if self.balance_loss.moge_probs == "group" and self.router != "moge":
            _fail(path, "balance_loss.moge_probs", "'group' applies to router 'moge' only", origins,
                  self.balance_loss.moge_probs, "global (or router: moge)")
        if self.dispatch_block_size and self.dispatch_backend != "reference":
            _fail(path, "dispatch_block_size", f"needs dispatch_backend 'reference' (the {self.dispatch_backend} "
                  "dispatch sizes its blocks itself)", origins, self.dispatch_block_size, "0")
        if self.num_experts_per_tok > self.num_experts:
            _fail(path, "num_experts_per_tok", f"must be <= num_experts ({self.num_experts})", origins,
                  self.num_experts_per_tok, f"1..{self.num_experts}")
        if self.router == "moge":
            if self.num_experts % self.num_groups:
                _fail(path, "num_groups", f"must divide num_experts ({self.num_experts}) for MoGE", origins,
                      self.num_groups)
            if self.num_experts_per_tok % self.num_groups:
                _fail(path, "num_experts_per_tok", f"must be a multiple of num_groups ({self.num_groups}) "
                      "for MoGE (K' = K / groups per group)", origins, self.num_experts_per_tok)
            if self.num_groups == 1:
                _fail(path, "num_groups", "MoGE needs at least 2 groups", origins, self.num_groups,
                      "a divisor of num_experts greater than 1")
        elif self.num_groups != 1 or self.topk_group != 1:
            _fail(path, "num_groups", "group-limited top-k routing is not supported; topk routing uses one "
                  "group (n_group=1, topk_group=1)", origins, self.num_groups, "1 (or router: moge)")


@dataclass
class ModelConfig(Section):
    type: str = option("pangu_ultra_moe", "Architecture: pangu_ultra_moe (MLA, sandwich norm, top-k MoE, MTP) or "
                                          "pangu_pro_moe (GQA with biases, MoGE).",
                       choices=MODEL_TYPES, aliases=("model_type",), value_aliases=MODEL_TYPE_ALIASES)
    vocab_size: int = option(153376, "Vocabulary size (checkpoints may pad to a multiple of 128).", ge=1)
    hidden_size: int = option(256, "Model width d.", ge=1, aliases=("n_embd", "d_model"))
    num_layers: int = option(4, "Decoder layers L (MTP layers not included).", ge=1,
                             aliases=("num_hidden_layers", "n_layer", "num_decoder_layers"))
    num_attention_heads: int = option(4, "Query heads.", ge=1, aliases=("num_heads", "n_head", "n_heads"))
    num_key_value_heads: Optional[int] = option(None, "GQA key/value heads (Pro MoE); default = query heads.",
                                                ge=1, aliases=("n_kv_heads", "num_query_groups"))
    head_dim: Optional[int] = option(None, "GQA head size; default hidden_size / num_attention_heads.", ge=1,
                                     aliases=("kv_channels",))
    q_lora_rank: Optional[int] = option(None, "MLA query latent rank; null projects queries directly.", ge=1,
                                        aliases=("attention_q_lora_dim",))
    kv_lora_rank: int = option(64, "MLA key/value latent rank (what the KV cache stores).", ge=1,
                               aliases=("attention_kv_lora_dim",))
    qk_nope_head_dim: int = option(32, "MLA per-head query/key size without RoPE.", ge=1,
                                   aliases=("attention_qk_dim",))
    qk_rope_head_dim: int = option(16, "MLA per-head RoPE size (key RoPE part shared across heads).", ge=2,
                                   aliases=("attention_qk_rope_dim", "qk_pos_emb_head_dim"))
    v_head_dim: int = option(32, "MLA per-head value size.", ge=1, aliases=("attention_v_dim",))
    attention_bias: bool = option(False, "Bias on the q/k/v/o projections (Pro MoE: true).",
                                  aliases=("add_qkv_bias",))
    intermediate_size: int = option(512, "SwiGLU intermediate size of the dense layers.", ge=1,
                                    aliases=("ffn_hidden_size",))
    first_k_dense_replace: int = option(1, "Leading dense (non-MoE) layers.", ge=0,
                                        aliases=("num_dense_layers",))
    hidden_act: str = option("silu", "FFN activation (SwiGLU).", choices=("silu",))
    rms_norm_eps: float = option(1e-5, "RMSNorm epsilon.", gt=0.0, aliases=("layernorm_epsilon", "norm_eps"))
    rope_theta: float = option(25.6e6, "RoPE base.", gt=0.0, aliases=("rotary_base", "theta"))
    rope_interleave: bool = option(True, "RoPE layout: true rotates interleaved pairs (GPT-J, x0/x1), false "
                                         "rotates halves (Llama rotate_half).")
    max_position_embeddings: int = option(4096, "Longest sequence the RoPE table covers.", ge=1,
                                          aliases=("max_seq_len",))
    norm_backend: str = option("auto", "RMSNorm implementation. reference: composite MindSpore ops (any device; "
                                       "what parallel layouts shard). cpu_kernel: one C++ aot kernel each way "
                                       "(ops/cpu/norm_kernels.cc, CPU). auto: cpu_kernel on CPU when it builds "
                                       "and no semi-auto parallel context is set, else reference.",
                               choices=("auto", "reference", "cpu_kernel"))
    attention_backend: str = option("auto", "Causal softmax of the attention in training and prefill (the "
                                            "cached decode is decode_backend's). reference: composite MindSpore "
                                            "ops (any device; what parallel layouts shard). cpu_kernel: one C++ "
                                            "aot kernel each way (ops/cpu/softmax_kernels.cc, CPU). auto: "
                                            "cpu_kernel on CPU when it builds and no semi-auto parallel context "
                                            "is set, else reference.",
                                    choices=("auto", "reference", "cpu_kernel"))
    decode_backend: str = option("auto", "Cached decode (serving) implementation of each layer's attention and "
                                         "routed experts; training is unaffected. reference: composite MindSpore "
                                         "ops (any device). cpu_kernel: one C++ aot kernel each "
                                         "(ops/cpu/decode_kernels.cc MlaDecode / GqaDecode, moe_kernels.cc "
                                         "MoeRowExperts, float32 compute only; CPU, forward only). auto: "
                                         "cpu_kernel on CPU when it builds and no semi-auto parallel context is "
                                         "set, else reference.",
                                 choices=("auto", "reference", "cpu_kernel"))
    dynamic_shapes: bool = option(False, "Build the graphs for a batch and sequence length known only at run time "
                                         "(the MindIR prefill export sets it): positions, the causal mask and "
                                         "the dispatch offsets are computed by ops instead of folded into "
                                         "constants while compiling; the reference dispatcher then needs a fixed "
                                         "moe.dispatch_block_size.")
    norm_layout: str = option("dssn", "pre_ln: 2 RMSNorms per layer. sandwich: 4 (input, post-attention output, "
                                      "pre-MLP, post-MLP output). dssn: sandwich with the post-norm gamma "
                                      "initialised to c/sqrt(L).", choices=("pre_ln", "sandwich", "dssn"))
    dssn_c_attn: float = option(0.283, "DSSN c for the post-attention norm (Pangu Ultra: 0.283).", gt=0.0)
    dssn_c_mlp: float = option(0.432, "DSSN c for the post-MLP norm (Pangu Ultra: 0.432).", gt=0.0)
    init_method: str = option("tinyinit", "tinyinit: std sqrt(1/(2 d L)) for matrices, embedding std 0.5. "
                                          "baseline: std sqrt(2/(5d)), residual outputs sqrt(2/(5dL)).",
                              choices=("tinyinit", "baseline"))
    embedding_init_std: Optional[float] = option(None, "Embedding init std; default 0.5 (tinyinit) or "
                                                       "sqrt(2/(5d)) (baseline).", gt=0.0)
    tie_word_embeddings: bool = option(False, "Share the input embedding with the LM head.")
    num_mtp_layers: int = option(1, "Multi-token-prediction layers (DeepSeek-V3 style).", ge=0,
                                 aliases=("num_nextn_predict_layers", "mtp_num_layers", "mtp_depth"))
    mtp_loss_weight: float = option(0.3, "Weight of the MTP loss.", ge=0.0,
                                    aliases=("mtp_loss_factor", "mtp_loss_scaling_factor"))
    compute_dtype: str = option("float32", "Matmul dtype. Master weights stay float32. bfloat16 matmul does "
                                           "not run on CPU.", choices=("float32", "float16", "bfloat16"))
    moe: MoEConfig = option(MoEConfig(), "Mixture-of-experts layers.")

    HOISTED = {
        "n_routed_experts": "moe.num_experts", "num_routed_experts": "moe.num_experts",
        "num_experts": "moe.num_experts", "expert_num": "moe.num_experts", "num_moe_experts": "moe.num_experts",
        "num_local_experts": "moe.num_experts",
        "num_experts_per_tok": "moe.num_experts_per_tok", "moe_router_topk": "moe.num_experts_per_tok",
        "num_experts_chosen": "moe.num_experts_per_tok",
        "moe_intermediate_size": "moe.intermediate_size", "moe_ffn_hidden_size": "moe.intermediate_size",
        "n_shared_experts": "moe.num_shared_experts", "num_shared_experts": "moe.num_shared_experts",
        "shared_expert_num": "moe.num_shared_experts",
        "shared_expert_intermediate_size": "moe.shared_expert_intermediate_size",
        "scoring_func": "moe.score_function", "moe_router_score_function": "moe.score_function",
        "n_group": "moe.num_groups", "moe_router_num_groups": "moe.num_groups",
        "topk_group": "moe.topk_group", "moe_router_group_topk": "moe.topk_group",
        "norm_topk_prob": "moe.norm_topk_prob",
        "routed_scaling_factor": "moe.routed_scaling_factor",
        "moe_router_topk_scaling_factor": "moe.routed_scaling_factor",
        "router_aux_loss_coef": "moe.balance_loss.coeff", "moe_aux_loss_coeff": "moe.balance_loss.coeff",
    }

    def validate(self, path, origins):
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            _fail(path, "num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})",
                  origins, kv)
        if self.type == "pangu_pro_moe" and self.head_dim is None and self.hidden_size % self.num_attention_heads:
            _fail(path, "num_attention_heads", f"must divide hidden_size ({self.hidden_size}) unless head_dim "
                  "is set", origins, self.num_attention_heads)
        if self.qk_rope_head_dim % 2:
            _fail(path, "qk_rope_head_dim", "RoPE needs an even size", origins, self.qk_rope_head_dim)
        if self.type == "pangu_pro_moe" and (self.head_dim or self.hidden_size // self.num_attention_heads) % 2:
            _fail(path, "head_dim", "RoPE over the full head needs an even head size", origins, self.head_dim)
        if self.first_k_dense_replace > self.num_layers:
            _fail(path, "first_k_dense_replace", f"must be <= num_layers ({self.num_layers})", origins,
                  self.first_k_dense_replace, f"0..{self.num_layers}")
        if self.dynamic_shapes and not self.moe.dispatch_block_size:
            _fail(path, "dynamic_shapes", "needs a fixed moe.dispatch_block_size (the reference dispatcher sizes its "
                  "blocks from the token count, which a dynamic graph does not know)", origins, self.dynamic_shapes,
                  "false, or moe.dispatch_backend: reference with moe.dispatch_block_size: 8")


@dataclass
class ParallelConfig(Section):
    data_parallel: int = option(1, "Data-parallel degree.", ge=1, aliases=("data_parallel_size",))
    model_parallel: int = option(1, "Tensor-parallel degree.", ge=1,
                                 aliases=("tensor_model_parallel_size", "tensor_parallel"))
    context_parallel: int = option(1, "Context-parallel degree.", ge=1, aliases=("context_parallel_size",))
    expert_parallel: int = option(1, "Expert-parallel degree (folded into the DP x TP x CP group).", ge=1,
                                  aliases=("expert_model_parallel_size",))
    pipeline_stage: int = option(1, "Pipeline stages.", ge=1, aliases=("pipeline_model_parallel_size",))
    pp_interleave_num: int = option(1, "Virtual pipeline chunks per stage (VPP).", ge=1,
                                    aliases=("virtual_pipeline_model_parallel_size",))
    micro_batch_num: int = option(1, "Pipeline micro-batches per step.", ge=1)
    use_seq_parallel: bool = option(False, "Sequence parallel in the TP group.", aliases=("sequence_parallel",))
    vocab_emb_dp: bool = option(True, "Shard the embedding table by data parallel instead of model parallel.")
    optimizer_shard: bool = option(False, "ZeRO-style optimizer-state sharding over data parallel.")
    gradient_aggregation_group: int = option(4, "Gradients fused per all-reduce.", ge=1)
    rank_order: str = option("tp-cp-ep-dp-pp", "How ranks are numbered, fastest-varying first (Megatron's "
                             "order): tp and ep first keeps them inside a node. EP is carved from the dims "
                             "listed after it, before pp.")
    noop_layers: int = option(0, "Identity layers added to even out pipeline chunks (Pangu Pro MoE: 48 + 2).",
                              ge=0)
    pipeline_layers: Optional[List[int]] = option(None, "Decoder layers per pipeline chunk (pp x vpp entries, "
                                                        "chunk c runs on stage c mod pp); default: balanced by "
                                                        "cost, embedding / LM head / MTP included.")

    def validate(self, path, origins):
        dims = self.rank_order.split("-")
        if sorted(dims) != ["cp", "dp", "ep", "pp", "tp"] or dims[-1] != "pp":
            _fail(path, "rank_order", "must order each of tp, cp, ep, dp once, then pp last", origins,
                  self.rank_order, "e.g. 'tp-cp-ep-dp-pp' or 'tp-ep-cp-dp-pp'")


@dataclass
class RunnerConfig(Section):
    epochs: int = option(1, "Passes over the dataset (training stops at train_steps if that comes first).", ge=1)
    batch_size: int = option(8, "Sequences per micro-batch per data-parallel rank.", ge=1)
    train_steps: int = option(100, "Optimizer steps to run.", ge=1, aliases=("total_steps",))
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimizer step.", ge=1)
    max_consecutive_skips: int = option(5, "Stop after this many optimizer steps in a row were skipped for "
                                           "non-finite loss or gradients.", ge=1)
    loss_scale: float = option(1.0, "Initial loss scale (float16 compute); halved on overflow, doubled after "
                                    "loss_scale_window good steps.", gt=0.0, aliases=("scale_sense",))
    loss_scale_window: int = option(1000, "Good steps before the float16 loss scale doubles.", ge=1)
    sink_mode: bool = option(False, "Dataset sink mode (Ascend).")
    sink_size: int = option(1, "Steps per sink.", ge=1)
    engine: str = option("auto", "How a training step is compiled. layerwise: one graph per decoder-layer "
                                 "kind (dense, MoE) run for every layer of that kind, with per-layer recompute: "
                                 "compile time and activation memory flat in depth (mindpangu/train/layerwise.py). "
                                 "whole_graph: the whole model in one graph, no recompute: faster steps, but "
                                 "compile time and memory grow with every layer. auto: whole_graph up to 8 "
                                 "decoder layers, layerwise beyond.",
                         choices=("auto", "layerwise", "whole_graph"))


@dataclass
class OptimizerConfig(Section):
    type: str = option("AdamW", "Optimizer.", choices=("AdamW", "adamw"))
    betas: List[float] = option([0.9, 0.95], "Adam beta1, beta2.")
    eps: float = option(1e-8, "Adam epsilon.", gt=0.0)
    weight_decay: float = option(0.1, "Decoupled weight decay (not applied to norms and biases).", ge=0.0)
    grad_clip: float = option(1.0, "Global-norm gradient clipping; 0 disables it.", ge=0.0,
                              aliases=("max_grad_norm", "clip_grad"))

    def validate(self, path, origins):
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _fail(path, "betas", "needs two numbers in [0, 1)", origins, self.betas, "e.g. [0.9, 0.95]")


@dataclass
class LRScheduleConfig(Section):
    type: str = option("cosine", "cosine (warmup + cosine to lr_end), constant (warmup + constant) or "
                                 "multi_cosine (consecutive cosine legs, Pro MoE). mindformers names "
                                 "CosineWithWarmUpLR / ConstantWarmUpLR are accepted.",
                       choices=("cosine", "constant", "multi_cosine"),
                       value_aliases={"CosineWithWarmUpLR": "cosine", "ConstantWarmUpLR": "constant"})
    learning_rate: float = option(1e-3, "Peak learning rate.", gt=0.0, aliases=("lr", "max_lr"))
    lr_end: float = option(1e-4, "Final learning rate of the cosine.", ge=0.0, aliases=("min_lr",))
    warmup_steps: int = option(0, "Linear warmup steps.", ge=0)
    warmup_ratio: Optional[float] = option(None, "Warmup as a fraction of total steps (overrides warmup_steps).",
                                           ge=0.0, le=1.0)
    legs: List[List[float]] = option([], "multi_cosine legs: [[lr_start, lr_end, fraction_of_steps], ...].")

    def validate(self, path, origins):
        if self.type == "multi_cosine":
            if not self.legs or any(len(leg) != 3 or min(leg) < 0 for leg in self.legs):
                _fail(path, "legs", "multi_cosine needs legs [[lr_start, lr_end, fraction], ...]", origins,
                      self.legs, "e.g. [[3e-4, 3e-5, 0.7], [3e-5, 1e-5, 0.25], [1e-5, 1e-7, 0.05]]")
            if abs(sum(leg[2] for leg in self.legs) - 1.0) > 1e-3:
                _fail(path, "legs", "the leg fractions must sum to 1", origins, self.legs)


@dataclass
class DatasetConfig(Section):
    data_path: str = option("", "A preprocessed dataset directory (tools/preprocess_data.py), or a .txt / .jsonl "
                                "file that is preprocessed once into the cache. Relative to the YAML file.",
                            aliases=("dataset_dir", "data_dir"), path=True)
    tokenizer: str = option("byte", "'byte' (built-in byte-level, 257 ids) or a Hugging Face tokenizer.json "
                                    "(relative to the YAML file).", path=True)
    seq_length: int = option(128, "Tokens per training sequence.", ge=2)
    shuffle: bool = option(True, "Shuffle with the run seed.")
    eval_fraction: float = option(0.02, "Held-out fraction for eval loss.", ge=0.0, le=0.5)
    num_parallel_workers: int = option(1, "Dataset worker threads.", ge=1)
    drop_remainder: bool = option(True, "Drop the last incomplete batch.")


@dataclass
class RecomputeConfig(Section):
    recompute: Union[bool, List[int]] = option(False, "Recompute all layers (true) or this many per stage.")
    select_recompute: bool = option(False, "Recompute selected ops only.")
    mp_comm_recompute: bool = option(True, "Recompute model-parallel communication.")


@dataclass
class ContextConfig(Section):
    mode: Union[int, str] = option(0, "0/GRAPH_MODE (compiled, faster) or 1/PYNATIVE_MODE (eager).")
    device_target: str = option("CPU", "Device.", choices=("CPU", "Ascend", "GPU"))
    device_id: int = option(0, "Device index.", ge=0)
    max_device_memory: Optional[str] = option(None, "Device memory cap, e.g. '58GB' (Ascend).")
    jit_level: Optional[str] = option(None, "MindSpore jit level (O0/O1/O2).", choices=(None, "O0", "O1", "O2"))
    runtime_num_threads: Optional[int] = option(None, "Threads of MindSpore's CPU runtime (default: its own "
                                                      "choice). 1 lets several runs share the cores "
                                                      "(mindpangu-ablate --jobs).", ge=1)

    def validate(self, path, origins):
        if self.mode not in (0, 1, "GRAPH_MODE", "PYNATIVE_MODE"):
            _fail(path, "mode", "not an allowed value", origins, self.mode, "0 | 1 | GRAPH_MODE | PYNATIVE_MODE")

    @property
    def graph_mode(self) -> bool:
        return self.mode in (0, "GRAPH_MODE")


@dataclass
class LoggingConfig(Section):
    log_interval: int = option(10, "Steps between log lines.", ge=1)
    eval_interval: int = option(50, "Steps between eval-loss measurements; 0 disables eval.", ge=0)
    eval_batches: int = option(4, "Batches per eval.", ge=1)
    tensorboard: bool = option(True, "Write TensorBoard event files.")
    peak_tflops: Optional[float] = option(None, "Device peak for MFU, in TFLOP/s; default: measured fp32 matmul "
                                                "throughput on this machine.", gt=0.0)
    spike_sigma: float = option(4.0, "A loss or gradient-norm spike is a value above its running mean + "
                                     "spike_sigma running standard deviations.", gt=0.0)


@dataclass
class CheckpointConfig(Section):
    save_checkpoint_steps: int = option(100, "Steps between checkpoints (one is always written at the end).",
                                        ge=1)
    keep_checkpoint_max: int = option(3, "Checkpoints kept.", ge=1)
    prefix: str = option("mindpangu", "Checkpoint file prefix.")


@dataclass
class MeshConfig(Section):
    preset: str = option("", "A known cluster whose fields fill the rest: atlas_800t_a2 (8 x 910B per node), "
                             "cloudmatrix_384 (384 x 910C) or a100_80gb (8 x A100 per node, for validation); "
                             "empty: give the fields.",
                         choices=("", "atlas_800t_a2", "cloudmatrix_384", "a100_80gb"))
    nodes: int = option(0, "Nodes; 0: as many as the parallel layout needs.", ge=0)
    devices_per_node: int = option(0, "Devices per node (0: the preset's).", ge=0)
    peak_tflops: float = option(0.0, "Dense fp16/bf16 peak per device, TFLOP/s (0: the preset's).", ge=0.0)
    hbm_gb: float = option(0.0, "Device memory, GB (0: the preset's).", ge=0.0)
    intra_node_gbps: float = option(0.0, "Per-device bandwidth inside a node, GB/s (0: the preset's).", ge=0.0)
    inter_node_gbps: float = option(0.0, "Per-device bandwidth between nodes, GB/s (0: the preset's).", ge=0.0)
    gemm_max_eff: float = option(0.0, "Simulator: the best fraction of peak a large GEMM reaches (0: the "
                                      "preset's, 0.85).", ge=0.0, le=1.0)
    gemm_half_flops: float = option(0.0, "Simulator: GEMM size in FLOPs that reaches half of gemm_max_eff (0: the "
                                         "preset's, 2e10).", ge=0.0)
    intra_eff: float = option(0.0, "Simulator: fraction of the intra-node rate collectives get, memory-bound ops "
                                   "included (0: the preset's, 0.25).", ge=0.0, le=1.0)
    inter_eff: float = option(0.0, "Simulator: fraction of the inter-node rate collectives get (0: the preset's, "
                                   "0.5).", ge=0.0, le=1.0)


@dataclass(frozen=True)
class Constraint:
    """A rule between keys of different sections, checked when a recipe is loaded (``TrainConfig.validate``).

    ``problem(cfg)`` returns why ``cfg`` breaks the rule (None when it holds); the error names ``key`` with its
    value and ``allowed(cfg)``; ``others`` are the other keys the rule reads (listed in the README)."""
    name: str
    key: str
    others: Tuple[str, ...]
    problem: Callable[["TrainConfig"], Optional[str]]
    allowed: Callable[["TrainConfig"], str]


def _get(cfg: Section, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# Only rules whose breach would otherwise surface later (inside MindSpore, mid-run, or as silently wrong numbers).
# The parallel layout's own rules (degrees vs heads, experts, layers, micro-batches) are in
# mindpangu/parallel/plan.py: layout_problems, run before every training run and plan.
CONSTRAINTS: Tuple[Constraint, ...] = (
    Constraint("seq_within_positions", "train_dataset.seq_length", ("model.max_position_embeddings",),
               lambda c: f"longer than model.max_position_embeddings ({c.model.max_position_embeddings}), which "
                         "the RoPE table covers" if c.train_dataset.seq_length > c.model.max_position_embeddings
               else None,
               lambda c: f"<= {c.model.max_position_embeddings} (or raise model.max_position_embeddings)"),
    Constraint("mtp_within_seq", "model.num_mtp_layers", ("train_dataset.seq_length",),
               lambda c: f"MTP depth k predicts token t + k + 1, so it needs k < train_dataset.seq_length "
                         f"({c.train_dataset.seq_length})"
               if c.model.num_mtp_layers >= c.train_dataset.seq_length else None,
               lambda c: f"0..{c.train_dataset.seq_length - 1}"),
    Constraint("cpu_kernel_dispatch_on_cpu", "model.moe.dispatch_backend", ("context.device_target",),
               lambda c: f"the C++ kernels of ops/cpu run on CPU only, not on {c.context.device_target}"
               if c.model.moe.dispatch_backend == "cpu_kernel" and c.context.device_target != "CPU" else None,
               lambda c: "auto | reference | expert_major"),
    Constraint("cpu_kernel_norm_on_cpu", "model.norm_backend", ("context.device_target",),
               lambda c: f"the C++ kernels of ops/cpu run on CPU only, not on {c.context.device_target}"
               if c.model.norm_backend == "cpu_kernel" and c.context.device_target != "CPU" else None,
               lambda c: "auto | reference"),
    Constraint("cpu_kernel_attention_on_cpu", "model.attention_backend", ("context.device_target",),
               lambda c: f"the C++ kernels of ops/cpu run on CPU only, not on {c.context.device_target}"
               if c.model.attention_backend == "cpu_kernel" and c.context.device_target != "CPU" else None,
               lambda c: "auto | reference"),
    Constraint("cpu_kernel_decode_on_cpu", "model.decode_backend", ("context.device_target",),
               lambda c: f"the C++ kernels of ops/cpu run on CPU only, not on {c.context.device_target}"
               if c.model.decode_backend == "cpu_kernel" and c.context.device_target != "CPU" else None,
               lambda c: "auto | reference"),
    Constraint("ascend_dispatch_on_ascend", "model.moe.dispatch_backend", ("context.device_target",),
               lambda c: "MindSpore's fused MoE ops run on Ascend only"
               if c.model.moe.dispatch_backend == "ascend" and c.context.device_target != "Ascend" else None,
               lambda c: "auto | reference | cpu_kernel | expert_major (or context.device_target: Ascend)"),
)


@dataclass
class TrainConfig(Section):
    seed: int = option(1234, "Seed for init, data order and dropout.", ge=0)
    output_dir: str = option("./output", "Checkpoints, logs and metrics go here.")
    run_mode: str = option("train", "train | finetune | eval | predict.",
                           choices=("train", "finetune", "eval", "predict"))
    use_parallel: bool = option(False, "Launch under a distributed job (msrun).")
    resume_training: bool = option(False, "Continue from the newest checkpoint in output_dir.")
    load_checkpoint: Optional[str] = option(None, "Checkpoint or HF directory to initialise from.", path=True)
    model: ModelConfig = option(ModelConfig(), "The model.")
    parallel_config: ParallelConfig = option(ParallelConfig(), "Parallel layout (mindformers' keys).")
    runner_config: RunnerConfig = option(RunnerConfig(), "Batch size, steps, accumulation.")
    optimizer: OptimizerConfig = option(OptimizerConfig(), "Optimizer.")
    lr_schedule: LRScheduleConfig = option(LRScheduleConfig(), "Learning-rate schedule.")
    train_dataset: DatasetConfig = option(DatasetConfig(), "Training data.")
    recompute_config: RecomputeConfig = option(RecomputeConfig(), "Activation recompute.")
    context: ContextConfig = option(ContextConfig(), "mindspore.set_context arguments.")
    logging: LoggingConfig = option(LoggingConfig(), "What is logged and how often.")
    checkpoint: CheckpointConfig = option(CheckpointConfig(), "Checkpoint cadence and retention.")
    mesh: MeshConfig = option(MeshConfig(), "The cluster the parallel layout is planned for (tools/plan.py).")

    def validate(self, path, origins):
        for rule in CONSTRAINTS:
            problem = rule.problem(self)
            if problem:
                _fail("", rule.key, problem, origins, _get(self, rule.key), rule.allowed(self))
