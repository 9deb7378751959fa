"""Independent NumPy forward passes of the Pangu models, written from the papers, for tests.

Weights are dicts keyed by Hugging Face checkpoint names (per-expert tensors, ``model.layers.N...``), so nothing
here shares code or naming with mindpangu's model. Everything runs in float64.
"""
import numpy as np


def rms_norm(x, gamma, eps):
    return gamma * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


def rope(x, positions, theta, interleave):
    """Rotate the last axis of x [..., S, d] by position; pairs are (2i, 2i+1) or (i, i + d/2)."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = positions[:, None] * freqs[None, :]  # [S, d/2]
    cos, sin = np.cos(ang), np.sin(ang)
    out = np.empty_like(x)
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = b * cos + a * sin
    else:
        a, b = x[..., : d // 2], x[..., d // 2:]
        out[..., : d // 2] = a * cos - b * sin
        out[..., d // 2:] = b * cos + a * sin
    return out


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def swiglu(w, prefix, x):
    g = x @ w[f"{prefix}.gate_proj.weight"].T
    u = x @ w[f"{prefix}.up_proj.weight"].T
    return (silu(g) * u) @ w[f"{prefix}.down_proj.weight"].T


def routed_experts(gate, up, down, x, weights, indices):
    """sum_k weights[t, k] * SwiGLU_{indices[t, k]}(x[t]), token by token, in float64: stacked expert weights
    gate / up [E, I, H], down [E, H, I], x [T, H], weights / indices [T, K]."""
    gate, up, down, x = (np.asarray(a, np.float64) for a in (gate, up, down, x))
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(indices[t]):
            y[t] += weights[t, j] * ((silu(x[t] @ gate[e].T) * (x[t] @ up[e].T)) @ down[e].T)
    return y


def mla(w, p, c, x):
    """Multi-head latent attention on x [S, H] (one sequence), causal."""
    s = x.shape[0]
    n, nope, rd, vd = c["heads"], c["nope"], c["rope"], c["v"]
    q = rms_norm(x @ w[f"{p}.q_a_proj.weight"].T, w[f"{p}.q_a_layernorm.weight"], c["eps"]) @ w[f"{p}.q_b_proj.weight"].T
    q = q.reshape(s, n, nope + rd).transpose(1, 0, 2)
    lat = x @ w[f"{p}.kv_a_proj_with_mqa.weight"].T
    ckv, k_pe = lat[:, : c["kv_rank"]], lat[:, c["kv_rank"]:]
    kv = (rms_norm(ckv, w[f"{p}.kv_a_layernorm.weight"], c["eps"]) @ w[f"{p}.kv_b_proj.weight"].T)
    kv = kv.reshape(s, n, nope + vd).transpose(1, 0, 2)
    pos = np.arange(s, dtype=np.float64)
    q_pe = rope(q[..., nope:], pos, c["theta"], c["interleave"])
    k_pe = rope(k_pe, pos, c["theta"], c["interleave"])  # [S, rd], shared by all heads
    k = np.concatenate([kv[..., :nope], np.broadcast_to(k_pe, (n, s, rd))], -1)
    qf = np.concatenate([q[..., :nope], q_pe], -1)
    scores = qf @ k.transpose(0, 2, 1) / np.sqrt(nope + rd)
    scores = scores + np.triu(np.full((s, s), -np.inf), 1)
    out = softmax(scores) @ kv[..., nope:]
    return out.transpose(1, 0, 2).reshape(s, n * vd) @ w[f"{p}.o_proj.weight"].T


def gqa(w, p, c, x):
    """Grouped-query attention with q/k/v/o biases and RoPE over the full head, causal."""
    s = x.shape[0]
    n, kvh, hd = c["heads"], c["kv_heads"], c["head_dim"]
    q = (x @ w[f"{p}.q_proj.weight"].T + w[f"{p}.q_proj.bias"]).reshape(s, n, hd).transpose(1, 0, 2)
    k = (x @ w[f"{p}.k_proj.weight"].T + w[f"{p}.k_proj.bias"]).reshape(s, kvh, hd).transpose(1, 0, 2)
    v = (x @ w[f"{p}.v_proj.weight"].T + w[f"{p}.v_proj.bias"]).reshape(s, kvh, hd).transpose(1, 0, 2)
    pos = np.arange(s, dtype=np.float64)
    q, k = rope(q, pos, c["theta"], False), rope(k, pos, c["theta"], False)
    rep = n // kvh
    k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((s, s), -np.inf), 1)
    out = (softmax(scores) @ v).transpose(1, 0, 2).reshape(s, n * hd)
    return out @ w[f"{p}.o_proj.weight"].T + w[f"{p}.o_proj.bias"]


def route_topk(logits, k, normalise, scale, bias=None):
    """Sigmoid top-k (Ultra MoE): -> list of (expert, weight) per token."""
    scores = 1.0 / (1.0 + np.exp(-logits))
    choice = scores + (bias if bias is not None else 0.0)
    out = []
    for t in range(logits.shape[0]):
        idx = np.argsort(-choice[t], kind="stable")[:k]
        wts = scores[t, idx]
        if normalise:
            wts = wts / wts.sum()
        out.append(list(zip(idx, wts * scale)))
    return out


def route_moge(logits, groups, k_per_group, router_scale):
    """MoGE (Pro MoE): global softmax, top-k' inside each contiguous group, x router_scale, no renormalisation."""
    scores = softmax(logits)
    e = logits.shape[1]
    size = e // groups
    out = []
    for t in range(logits.shape[0]):
        chosen = []
        for g in range(groups):
            local = np.argsort(-scores[t, g * size:(g + 1) * size], kind="stable")[:k_per_group]
            for j in local:
                idx = g * size + j
                chosen.append((idx, scores[t, idx] * router_scale[idx]))
        out.append(chosen)
    return out


def moe(w, p, c, x):
    """Routed experts (looped per token) + shared expert."""
    logits = x @ w[f"{p}.gate.weight"].T
    if c.get("moge"):
        routes = route_moge(logits, c["groups"], c["k"] // c["groups"], w[f"{p}.router_scale"].reshape(-1))
    else:
        routes = route_topk(logits, c["k"], c["norm_topk"], c["scale"], w.get(f"{p}.gate.e_score_correction_bias"))
    y = np.zeros_like(x)
    for t, chosen in enumerate(routes):
        for e, wt in chosen:
            y[t] += wt * swiglu(w, f"{p}.experts.{e}", x[t:t + 1])[0]
    shared = c.get("shared_name", "shared_experts")
    if f"{p}.{shared}.gate_proj.weight" in w:
        y = y + swiglu(w, f"{p}.{shared}", x)
    return y


def decoder_layer(w, i, c, h):
    """One layer on h [S, H] under c['layout'] (pre_ln | sandwich)."""
    p = f"model.layers.{i}"
    attn = mla if c["attention"] == "mla" else gqa
    a = attn(w, f"{p}.self_attn", c, rms_norm(h, w[f"{p}.input_layernorm.weight"], c["eps"]))
    if c["layout"] == "sandwich":
        h = h + rms_norm(a, w[f"{p}.post_attention_layernorm.weight"], c["eps"])
        x = rms_norm(h, w[f"{p}.pre_mlp_layernorm.weight"], c["eps"])
    else:
        h = h + a
        x = rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], c["eps"])
    ffn = moe if f"{p}.mlp.gate.weight" in w else swiglu
    y = ffn(w, f"{p}.mlp", c, x) if ffn is moe else swiglu(w, f"{p}.mlp", x)
    if c["layout"] == "sandwich":
        y = rms_norm(y, w[f"{p}.post_mlp_layernorm.weight"], c["eps"])
    return h + y


def causal_lm(w, c, ids):
    """Main-head logits [B, S, V] for token ids [B, S]."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    out = []
    for seq in ids:
        h = w["model.embed_tokens.weight"][seq]
        for i in range(c["layers"]):
            h = decoder_layer(w, i, c, h)
        out.append(rms_norm(h, w["model.norm.weight"], c["eps"]) @ w["lm_head.weight"].T)
    return np.stack(out)


def mtp_logits(w, c, ids):
    """DeepSeek-V3 MTP depth 1 (weights at model.layers.{L}): logits [B, S-1, V] predicting t_{i+2}."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    n, eps = c["layers"], c["eps"]
    p = f"model.layers.{n}"
    out = []
    for seq in ids:
        h = w["model.embed_tokens.weight"][seq]
        for i in range(n):
            h = decoder_layer(w, i, c, h)
        nxt = w["model.embed_tokens.weight"][seq[1:]]
        x = np.concatenate([rms_norm(nxt, w[f"{p}.enorm.weight"], eps), rms_norm(h[:-1], w[f"{p}.hnorm.weight"], eps)], -1)
        x = decoder_layer(w, n, c, x @ w[f"{p}.eh_proj.weight"].T)
        out.append(rms_norm(x, w[f"{p}.shared_head.norm.weight"], eps) @ w["lm_head.weight"].T)
    return np.stack(out)
