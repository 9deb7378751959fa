"""Layout simulator against published numbers and independent counts: Megatron's MFU table from its FLOP
formula, the Pangu Ultra bubble, and FLOPs per token against the parameters of a built model."""
import numpy as np
import pytest

import mindpangu as mp
from conftest import ULTRA_TINY
from mindpangu.sim import ModelShape, bubble_fractions, forward_flops_per_token, training_flops

A100_BF16 = 312e12
# Korthikanti et al. 2022 Table 5 (sequence parallel + selective recompute) and the Megatron-LM README MFU column:
# (layers, hidden, heads, GPUs, global batch, seconds per iteration, published MFU %)
MEGATRON = {"22B": (48, 6144, 64, 8, 4, 1.10, 41.5), "175B": (96, 12288, 96, 64, 64, 13.75, 51.4),
            "530B": (105, 20480, 128, 280, 280, 37.83, 56.0), "1T": (128, 25600, 160, 512, 512, 71.49, 56.3)}


@pytest.mark.parametrize("name", list(MEGATRON))
def test_flops_reproduce_megatron_mfu(name):
    layers, hidden, heads, gpus, batch, seconds, mfu = MEGATRON[name]
    seq, vocab = 2048, 51200
    shape = ModelShape.dense_gpt(layers, hidden, heads, vocab)
    flops = training_flops(shape, batch * seq, seq, causal=False)
    # Megatron's model-FLOPs formula, written here from the paper
    formula = 72 * batch * seq * layers * hidden ** 2 * (1 + seq / (6 * hidden) + vocab / (12 * layers * hidden))
    assert flops == pytest.approx(formula, rel=1e-12)
    assert 100 * flops / (seconds * gpus * A100_BF16) == pytest.approx(mfu, abs=0.3)


def test_pangu_ultra_bubble_both_definitions():
    # Pangu Ultra dense: PP8, 16 micro-batches per DP rank, 6-way VPP (report section 4.2)
    plain, vpp = bubble_fractions(8, 16), bubble_fractions(8, 16, 6)
    assert round(100 * plain["bubble_over_total"], 2) == 30.43 and round(100 * vpp["bubble_over_total"], 2) == 6.80
    assert round(100 * plain["bubble_over_ideal"], 2) == 43.75 and round(100 * vpp["bubble_over_ideal"], 2) == 7.29
    with pytest.raises(ValueError, match="multiple of the stages"):
        bubble_fractions(8, 12, 2)


@pytest.mark.parametrize("recipe", [ULTRA_TINY, ULTRA_TINY.replace("pangu_ultra_moe", "pangu_pro_moe")])
def test_matmul_flops_equal_twice_the_active_weights_of_the_built_model(recipe):
    """Outside the attention core, forward FLOPs per token are 2 x the matrix weights a token multiplies by:
    counted here from the built model's parameters (routed experts at k / E; the embedding is a lookup; the MTP
    layer multiplies by the shared head once more)."""
    cfg = mp.load_config(recipe).model
    model = mp.build_model(cfg, init=False)
    k, e = cfg.moe.num_experts_per_tok, cfg.moe.num_experts
    main = mtp = 0.0
    for p in model.get_parameters():
        if len(p.shape) < 2 or "embed_tokens" in p.name or p.name.endswith("router_scale"):
            continue  # vectors, the lookup table, and Pro MoE's elementwise [1, E] router scale
        size = float(np.prod(p.shape)) * (k / e if ".mlp.experts." in p.name else 1.0)
        if "mtp_layers" in p.name:
            mtp += size
        else:
            main += size
    f = forward_flops_per_token(ModelShape.from_config(cfg), seq=64)
    core_per_layer = f["attention scores and values"] / cfg.num_layers
    assert sum(v for n, v in f.items() if n not in ("attention scores and values", "MTP")) == \
        pytest.approx(2 * main, rel=1e-12)
    if cfg.num_mtp_layers:
        head = cfg.vocab_size * cfg.hidden_size
        assert f["MTP"] == pytest.approx(2 * (mtp + cfg.num_mtp_layers * head) + cfg.num_mtp_layers * core_per_layer,
                                         rel=1e-12)


# Korthikanti et al. 2022 Table 5 layouts: (TP, PP, VPP, micro-batch size)
MEGATRON_LAYOUTS = {"22B": (8, 1, 1, 4), "175B": (8, 8, 3, 1), "530B": (8, 35, 3, 1), "1T": (8, 64, 1, 1)}


@pytest.mark.parametrize("name", list(MEGATRON))
def test_step_time_within_ten_percent_of_megatron(name):
    """One set of A100 constants (the a100_80gb preset) for every point; the measured seconds are the paper's."""
    from mindpangu.parallel.mesh import PRESETS
    from mindpangu.parallel.plan import Layout
    from mindpangu.sim.step import Run, simulate_step

    layers, hidden, heads, gpus, batch, seconds, _ = MEGATRON[name]
    tp, pp, vpp, mbs = MEGATRON_LAYOUTS[name]
    layout = Layout(dp=gpus // (tp * pp), tp=tp, pp=pp, vpp=vpp)
    out = simulate_step(ModelShape.dense_gpt(layers, hidden, heads, 51200), layout, PRESETS["a100_80gb"],
                        Run(seq=2048, global_batch=batch, micro_batch=mbs, recompute="selective"))
    assert out["step_s"] == pytest.approx(seconds, rel=0.04)  # the README and docs claim 4 %; the issue asks 10 %
    parts = sum(out[k] for k in ("compute_s", "tp_comm_s", "ep_comm_s", "cp_comm_s", "pp_comm_s", "bubble_s",
                                 "dp_comm_s"))
    assert parts == pytest.approx(out["step_s"], rel=1e-9)  # the split adds up


def test_search_ranks_valid_fitting_layouts_and_writes_a_recipe_that_loads(tmp_path):
    from mindpangu.parallel import check_layout, resolve_mesh
    from mindpangu.parallel.plan import Layout
    from mindpangu.sim.search import search, write_winner

    overrides = ["parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                 "parallel_config.expert_parallel=2", "parallel_config.pipeline_stage=2",
                 "parallel_config.micro_batch_num=4", "runner_config.batch_size=2"]
    cfg = mp.load_config(ULTRA_TINY, overrides)
    mesh = resolve_mesh(cfg.mesh, "a100_80gb", 8)
    fits, tried = search(cfg, mesh, 8)
    assert tried >= len(fits) > 10
    speeds = [c.step["tokens_per_s"] for c in fits]
    assert speeds == sorted(speeds, reverse=True)
    own = next(c for c in fits if c.layout == Layout.from_config(cfg))
    assert speeds[0] >= own.step["tokens_per_s"]
    for c in fits[:5]:  # every candidate keeps the recipe's tokens per step
        assert c.layout.dp * c.micro_batch * c.step["micro_batches"] == 2 * 2 * 4
    (path,) = write_winner(fits[0], ULTRA_TINY, overrides, str(tmp_path / "best.yaml"), "")
    best = mp.load_config(path)  # a recipe that loads, with the winner's layout, valid on the 8 devices
    assert check_layout(best, 8) == fits[0].layout


# Korthikanti et al. 2022 Fig. 1 (GiB per GPU): activations with no parallelism tricks and with sequence parallel +
# selective recompute, for the Table 5 layouts
KORTHIKANTI_FIG1 = {"22B": (59.25, 9.5625), "175B": (66.84, 12.35), "530B": (114.02, 23.08), "1T": (131.25, 26.56)}


@pytest.mark.parametrize("name", list(KORTHIKANTI_FIG1))
def test_activation_memory_matches_korthikanti_figure_1(name):
    from mindpangu.sim.memory import activation_bytes

    layers, hidden, heads, *_ = MEGATRON[name]
    tp, pp, vpp, mbs = MEGATRON_LAYOUTS[name]
    none, seq_sel = KORTHIKANTI_FIG1[name]
    common = dict(seq=2048, micro_batch=mbs, hidden=hidden, heads=heads, layers=layers, tp=tp, pp=pp, vpp=vpp)
    assert activation_bytes(**common) / 2 ** 30 == pytest.approx(none, rel=0.005)
    assert activation_bytes(**common, sequence_parallel=True, recompute="selective") / 2 ** 30 == \
        pytest.approx(seq_sel, rel=0.005)


def test_pro_moe_published_layout_is_predicted_faster_than_its_baseline():
    """Pangu Pro MoE (arXiv 2505.21411 section 4): TP8 / EP2 / PP5 / VPP5 with two no-op layers against the baseline
    TP1 / EP8 / CP8 / PP6 / VPP4, about 4K Atlas 800T A2 devices; the paper reports +35 % MFU."""
    from mindpangu.parallel import resolve_mesh
    from mindpangu.sim.report import simulate_config

    pro = ULTRA_TINY.replace("pangu_ultra_moe/tiny", "pangu_pro_moe/72b")
    optimised = mp.load_config(pro)
    baseline = mp.load_config(pro, [
        "parallel_config.data_parallel=80", "parallel_config.model_parallel=1", "parallel_config.context_parallel=8",
        "parallel_config.expert_parallel=8", "parallel_config.pipeline_stage=6", "parallel_config.pp_interleave_num=4",
        "parallel_config.noop_layers=0", "parallel_config.micro_batch_num=48", "parallel_config.use_seq_parallel=false"])
    mfu = {}
    for name, cfg in (("optimised", optimised), ("baseline", baseline)):
        mesh = resolve_mesh(cfg.mesh, "atlas_800t_a2", 4000 if name == "optimised" else 3840)
        mfu[name] = simulate_config(cfg, mesh)["step"]["mfu"]
    assert mfu["optimised"] > mfu["baseline"]


def test_hierarchical_all_to_all_sends_once_per_node():
    """Hierarchical dispatch crosses the network once per destination node: cheaper than flat when a node holds
    several EP ranks, the same when it holds one (TP fills the node)."""
    from mindpangu.parallel.mesh import PRESETS
    from mindpangu.parallel.plan import Layout
    from mindpangu.sim.step import Run, simulate_step

    shape = ModelShape(layers=4, hidden=4096, heads=32, vocab=32000, dense_layers=0, experts=64, top_k=8,
                       expert_ffn=1024)
    mesh = PRESETS["a100_80gb"]

    def ep_seconds(layout, how):
        return simulate_step(shape, layout, mesh, Run(seq=4096, global_batch=64, ep_a2a=how))["ep_comm_s"]

    wide = Layout(dp=64, tp=1, ep=64)  # 8 EP ranks per node, 8 nodes
    assert ep_seconds(wide, "hierarchical") < 0.8 * ep_seconds(wide, "flat")
    # the copies a token sends: 8 random experts of 64 reach 64 (1 - (63/64)^8) = 7.58 ranks on average
    assert shape.devices_per_token(64) == pytest.approx(64 * (1 - (63 / 64) ** 8))


def test_search_places_the_published_ultra_moe_layout_in_the_top_tenth():
    """Pangu Ultra MoE's published layout (TP8 / PP16 / VPP2 / EP4 on 6,144 Atlas 800T A2 devices) among the
    layouts that fit; docs/simulator.md discusses what the simulator prefers instead."""
    from mindpangu.parallel import resolve_mesh
    from mindpangu.parallel.plan import Layout
    from mindpangu.sim.search import rank_of, search

    cfg = mp.load_config(ULTRA_TINY.replace("tiny", "718b"))
    fits, _ = search(cfg, resolve_mesh(cfg.mesh, "atlas_800t_a2", 6144), 6144)
    assert rank_of(fits, Layout.from_config(cfg)) <= 0.10 * len(fits)


def test_a_custom_mesh_needs_its_figures():
    from mindpangu.config import ConfigError
    from mindpangu.parallel import resolve_mesh

    cfg = mp.load_config(ULTRA_TINY, ["mesh.devices_per_node=8"])
    with pytest.raises(ConfigError, match="mesh.peak_tflops"):
        resolve_mesh(cfg.mesh, "", 8)
