"""Parallel plans: rank coordinates and groups, validation with suggestions, pipeline stage maps, memory model."""
import itertools
import os

import pytest

import mindpangu as mp
from mindpangu.cli import plan_main
from mindpangu.parallel import Layout, ParallelConfigError, check_layout, coordinates, groups, resolve_mesh, stage_plan
from mindpangu.parallel.memory import stage_memory
from mindpangu.parallel.plan import balance_groups, layout_problems, split_layers
from conftest import ROOT, ULTRA_718B, ULTRA_TINY

PRO_TINY = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "tiny.yaml")
PRO_72B = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "72b.yaml")


def par(path, **kw):
    return mp.load_config(path, overrides=[f"parallel_config.{k}={v}" for k, v in kw.items()])


def test_coordinates_are_a_bijection_with_tp_innermost_and_ep_across_dp():
    cfg = par(ULTRA_TINY, data_parallel=4, model_parallel=2, expert_parallel=2, pipeline_stage=2, micro_batch_num=2)
    layout = check_layout(cfg, 16)
    coords = coordinates(layout, devices_per_node=8)
    keys = {(c.dp, c.tp, c.cp, c.pp) for c in coords}
    assert len(keys) == 16
    # order tp-cp-ep-dp-pp: rank = tp + 2 * dp + 8 * pp; ep = dp % 2 (stride tp x cp = 2)
    for c in coords:
        assert c.rank == c.tp + 2 * c.dp + 8 * c.pp and c.ep == c.dp % 2 and c.node == c.rank // 8
    g = groups(layout, 8)
    assert g["tp"][0] == [0, 1] and g["dp"][0] == [0, 2, 4, 6] and g["pp"][0] == [0, 8]
    assert g["ep"][0] == [0, 2] and g["ep"][1] == [1, 3]  # EP peers: same tp coordinate, neighbouring dp
    assert g["expert_dp"][0] == [0, 4]  # same experts: same ep rank and tp coordinate
    for name, gs in g.items():  # every group kind partitions the ranks
        assert sorted(itertools.chain(*gs)) == list(range(16)), name


def test_ep_first_in_the_order_carves_ep_from_tp():
    cfg = par(ULTRA_TINY, data_parallel=2, model_parallel=2, expert_parallel=4, rank_order="ep-tp-cp-dp-pp")
    layout = check_layout(cfg, 4)
    assert [c.ep for c in coordinates(layout)] == [0, 1, 2, 3]


@pytest.mark.parametrize("order,dp,tp,ep,want", [
    ("tp-cp-ep-dp-pp", 4, 2, 2, (4, 2)),  # EP groups {0,2}, {1,3}, {4,6}, {5,7}: DP ranks {0,1} and {2,3}
    ("tp-cp-ep-dp-pp", 4, 2, 4, (4, 4)),  # one EP group per TP coordinate, over all four DP ranks
    ("ep-tp-cp-dp-pp", 4, 2, 2, (4, 1)),  # EP groups {0,1}, ...: the two TP ranks of one DP rank (same tokens)
    ("ep-tp-cp-dp-pp", 2, 2, 4, (2, 2)),  # EP group {0,1,2,3}: DP ranks 0 and 1
])
def test_balance_groups_are_the_dp_ranks_of_an_ep_group(order, dp, tp, ep, want):
    cfg = par(ULTRA_TINY, data_parallel=dp, model_parallel=tp, expert_parallel=ep, rank_order=order)
    assert balance_groups(check_layout(cfg, dp * tp)) == want


BAD = [  # (overrides, devices, words the message must contain)
    ({"data_parallel": 2, "model_parallel": 2}, 8, ["= 4", "8 devices"]),
    ({"model_parallel": 3}, 3, ["model_parallel (3)", "num_attention_heads"]),
    ({"expert_parallel": 3, "data_parallel": 3}, 3, ["expert_parallel (3)", "num_experts (8)"]),
    ({"expert_parallel": 2}, 1, ["expert_parallel (2) must divide the 1 ranks"]),
    ({"expert_parallel": 4, "data_parallel": 2, "model_parallel": 2}, 4, ["expert_parallel (4) must divide the 2"]),
    ({"pipeline_stage": 2, "micro_batch_num": 1}, 2, ["micro_batch_num (1)", "pipeline_stage (2)"]),
    ({"pp_interleave_num": 2}, 1, ["pp_interleave_num", "pipeline_stage > 1"]),
    ({"pipeline_stage": 2, "pp_interleave_num": 2, "micro_batch_num": 3}, 2, ["multiple of pipeline_stage"]),
    ({"pipeline_stage": 4, "pp_interleave_num": 2, "micro_batch_num": 4}, 4, ["every chunk needs a layer"]),
    ({"pipeline_stage": 2, "micro_batch_num": 2, "pipeline_layers": "[3,3]"}, 2, ["pipeline_layers", "sum to"]),
    ({"pipeline_stage": 2, "micro_batch_num": 2, "pipeline_layers": "[4]"}, 2, ["has 1 entries"]),
    ({"pipeline_stage": 2, "micro_batch_num": 2, "noop_layers": 1}, 2, ["noop_layers", "multiple of 2"]),
    ({"pipeline_stage": 2, "micro_batch_num": 2, "noop_layers": 2, "pipeline_layers": "[2,2]"}, 2, ["either"]),
    ({"model_parallel": 2, "use_seq_parallel": "true"}, 2, None),  # valid: 128 % 2 == 0
    ({"context_parallel": 3, "data_parallel": 1}, 3, ["seq_length (128)", "divisible by 6"]),
    ({"model_parallel": 8}, 8, ["model_parallel (8)", "num_attention_heads (4)"]),
]
BAD_PRO = [
    ({"expert_parallel": 8, "data_parallel": 8}, 8, ["MoGE groups", "num_groups = 4"]),  # 16 experts, 4 groups
    ({"expert_parallel": 16, "data_parallel": 16}, 16, ["MoGE groups", "must divide them"]),
    ({"model_parallel": 4}, 4, ["num_key_value_heads (2)"]),  # 4 heads / 2 kv heads: tp 4 > kv and 4 % 2 == 0 ok
    ({"pipeline_stage": 2, "micro_batch_num": 2, "runner_config_accum": 2}, 2, ["gradient_accumulation_steps"]),
]


def _check_rejected(path, overrides, devices, words):
    extra = {k: v for k, v in overrides.items() if k != "runner_config_accum"}
    cfg = par(path, **extra)
    if "runner_config_accum" in overrides:
        cfg.runner_config.gradient_accumulation_steps = overrides["runner_config_accum"]
    if words is None:
        check_layout(cfg, devices)
        return
    with pytest.raises(ParallelConfigError) as e:
        check_layout(cfg, devices)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "Nearest valid layouts: " in msg
    # each suggestion is itself valid on the same devices
    for s in e.value.suggestions:
        fields = dict(kv.split("=") for kv in s.replace(", ", ",").split())
        ok = par(path, **{**extra, **fields})
        ok.runner_config.gradient_accumulation_steps = cfg.runner_config.gradient_accumulation_steps
        assert not layout_problems(Layout.from_config(ok), ok, devices), s


@pytest.mark.parametrize("overrides,devices,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_ultra_layouts_are_rejected_with_fields_and_alternatives(overrides, devices, words):
    _check_rejected(ULTRA_TINY, overrides, devices, words)


@pytest.mark.parametrize("overrides,devices,words", BAD_PRO, ids=[str(i) for i in range(len(BAD_PRO))])
def test_bad_pro_layouts_are_rejected(overrides, devices, words):
    if overrides.get("model_parallel") == 4:  # kv 2 and tp 4 divide one another: accepted
        words = None
    _check_rejected(PRO_TINY, overrides, devices, words)


def test_bad_rank_order_is_a_config_error():
    with pytest.raises(mp.config.ConfigError, match="rank_order"):
        par(ULTRA_TINY, rank_order="tp-dp-pp")


def test_split_layers_is_optimal_against_brute_force():
    costs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for chunks, first, last in [(3, 0.0, 4.0), (4, 1.0, 7.0), (2, 0.0, 0.0)]:
        got = split_layers(costs, chunks, first, last)
        best = min(
            max(sum(costs[a:b]) + (first if i == 0 else 0) + (last if i == chunks - 1 else 0)
                for i, (a, b) in enumerate(zip((0,) + cut, cut + (len(costs),))))
            for cut in itertools.combinations(range(1, len(costs)), chunks - 1))
        bounds = [0] + list(itertools.accumulate(got))
        cost = max(sum(costs[a:b]) + (first if i == 0 else 0) + (last if i == chunks - 1 else 0)
                   for i, (a, b) in enumerate(zip(bounds, bounds[1:])))
        assert sum(got) == len(costs) and min(got) >= 1 and abs(cost - best) < 1e-9


def test_published_stage_maps():
    pro = mp.load_config(PRO_72B)
    plan = stage_plan(pro, check_layout(pro, 4000))
    assert len(plan.layers) == 25 and all(len(ls) + n == 2 for ls, n in zip(plan.layers, plan.noop))
    assert sum(plan.noop) == 2 and plan.noop[-1] == 1  # the padding relieves the chunk with the LM head
    assert [i for ls in plan.layers for i in ls] == list(range(48))
    assert plan.mindformers_offset() == [[0] * 5] * 5
    ultra = mp.load_config(ULTRA_718B)
    plan = stage_plan(ultra, check_layout(ultra, 6144))
    assert len(plan.layers) == 32 and sum(map(len, plan.layers)) == 61
    assert len(plan.layers[-1]) == 1  # head + MTP weigh about two layers
    assert plan.stage_layers(0) == plan.layers[0] + plan.layers[16]


def test_memory_model_by_hand():
    """Tiny Pro MoE, DP2 x TP2 x EP2, one stage, no recompute: every term computed here from the YAML numbers."""
    cfg = par(PRO_TINY, data_parallel=2, model_parallel=2, expert_parallel=2, use_seq_parallel="true",
              vocab_emb_dp="false")
    layout = check_layout(cfg, 4)
    mem = stage_memory(cfg, layout, stage_plan(cfg, layout), 0)
    h, v, layers, n, kv, d, e, k, i, shared = 128, 1024, 4, 4, 2, 32, 16, 4, 32, 128
    attention = h * n * d + 2 * h * kv * d + n * d * h + (n * d + 2 * kv * d + h)  # with biases, TP-sharded
    per_layer_rep = 2 * h + e * h + e  # 2 norms, router, router_scale
    per_layer_tp = attention + 3 * h * shared
    experts = e * 3 * h * i
    params = layers * (per_layer_rep + per_layer_tp / 2 + experts / (2 * 2)) + h + (v * h + v * h) / 2
    assert mem["weights"] == pytest.approx(2 * params)
    assert mem["grads"] == pytest.approx(4 * params) and mem["optimizer"] == pytest.approx(12 * params)
    tokens = 8 * 128
    per_token = (2 + 2) * h / 2 + (2 * n * d + 2 * kv * d) / 2 + 4 * e + (2 * k * h + 3 * k * i + 3 * shared) / 2
    logits = tokens * v / 2 * 4
    assert mem["activations"] == pytest.approx(layers * per_token * tokens * 2 + logits)
    shard = stage_memory(cfg, layout, stage_plan(cfg, layout), 0, recompute=True, optimizer_shard=True)
    dense = layers * (per_layer_rep + per_layer_tp / 2) + h + v * h
    assert shard["optimizer"] == pytest.approx(12 * (dense / 2 + layers * experts / 4 / 1))
    assert shard["activations"] == pytest.approx(layers * h / 2 * tokens * 2 + per_token * tokens * 2 + logits)


def test_plan_cli_prints_published_layouts(capsys):
    plan_main(["--config", ULTRA_718B, "--mesh", "atlas_800t_a2"])
    out = capsys.readouterr().out
    assert "DP48xTP8xEP4xPP16xVPP2 (6144 ranks" in out and "768 node(s) x 8 devices" in out
    assert "tp            8    768  yes" in out
    assert "with full recompute + optimizer sharding" in out and "fits in 64 GB" in out
    plan_main(["--config", PRO_72B])
    out = capsys.readouterr().out
    assert "DP100xTP8xEP2xPP5xVPP5" in out and "+ 1 no-op" in out


def test_mesh_presets_and_errors():
    assert resolve_mesh(name="cloudmatrix_384").devices == 384
    assert resolve_mesh(name="atlas_800t_a2", devices=20).nodes == 3
    with pytest.raises(mp.config.ConfigError, match="devices_per_node"):
        resolve_mesh()
    with pytest.raises(mp.config.ConfigError, match="unknown mesh"):
        resolve_mesh(name="tpu")
