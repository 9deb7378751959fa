"""The training step of both tiny models compiled by MindSpore's real Ascend parallel compiler for 8 simulated
ranks (stub CANN libraries, DryRun level 0), in three layouts, as the first and the last rank; every parameter's
compiled slice must equal mindpangu.parallel's prediction, and the ep_group balance loss must be all-reduced over
the plan's EP group. Run by its own CI step (`python -m pytest -q tests_sim`): the first run builds the stubs
(about a minute), each compile takes 10-30 s."""
import os

import pytest

from mindpangu.train.sim_compile import compile_rank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"ultra": "yaml_configs/pangu_ultra_moe/tiny.yaml", "pro": "yaml_configs/pangu_pro_moe/tiny.yaml"}
SMALL = ["runner_config.batch_size=2", "train_dataset.seq_length=32"]
LAYOUTS = {
    "DP2xTP2xPP2xEP2": ["parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                        "parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=2",
                        "parallel_config.expert_parallel=2"],
    "DP4xTP2xEP2+SP": ["parallel_config.data_parallel=4", "parallel_config.model_parallel=2",
                       "parallel_config.expert_parallel=2", "parallel_config.use_seq_parallel=true"],
    "DP2xTP4xEP2+vocabTP": ["parallel_config.data_parallel=2", "parallel_config.model_parallel=4",
                            "parallel_config.expert_parallel=2", "parallel_config.vocab_emb_dp=false"],
}


def assert_balance_pooled_over_ep_group(model, report, overrides):
    """Ultra MoE's ep_group balance loss pools each layer's routing statistics by an all-reduce over exactly this
    rank's EP group of the plan (with DP > EP, not over every DP rank), global_batch over its DP group; Pro MoE's
    micro_batch loss pools nothing."""
    from mindpangu.config import load_config
    from mindpangu.parallel.plan import Layout, groups

    cfg = load_config(os.path.join(ROOT, TINY[model]), overrides=overrides)
    kind = cfg.model.moe.balance_loss.type
    if kind in ("ep_group", "global_batch"):
        group = next(g for g in groups(Layout.from_config(cfg))["ep" if kind == "ep_group" else "dp"]
                     if report.rank in g)
        assert report.all_reduces.get("group_sum") == [group]
    else:
        assert "group_sum" not in report.all_reduces


@pytest.mark.parametrize("rank", [0, 7])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("model", sorted(TINY))
def test_compiled_slices_equal_prediction(model, layout, rank, tmp_path):
    report = compile_rank(os.path.join(ROOT, TINY[model]), rank, str(tmp_path), SMALL + LAYOUTS[layout])
    assert report.ok, "\n".join(report.mismatches)
    assert report.slices and report.strategies > 0
    pipeline = "PP2" in layout
    assert report.stage == (rank // 4 if pipeline else 0)
    held = set(report.slices)
    if pipeline:  # each stage compiles only its own parameters
        assert ("model.embed_tokens.weight" in held) == (rank == 0)
        assert ("model.norm.weight" in held) == (rank == 7)
    assert_balance_pooled_over_ep_group(model, report, SMALL + LAYOUTS[layout])


def test_global_batch_balance_loss_pools_over_the_dp_group(tmp_path):
    """A semi-auto parallel step pools the global_batch statistics of each micro-batch over every DP rank."""
    overrides = SMALL + LAYOUTS["DP4xTP2xEP2+SP"] + ["model.moe.balance_loss.type=global_batch"]
    report = compile_rank(os.path.join(ROOT, TINY["ultra"]), 0, str(tmp_path), overrides)
    assert report.ok, "\n".join(report.mismatches)
    assert_balance_pooled_over_ep_group("ultra", report, overrides)


# Each model in the shape of its published layout (Ultra MoE TP8 / PP16 / VPP2 / EP4; Pro MoE TP8 / EP2 / PP5 / VPP5
# with two no-op layers), scaled to 8 ranks: interleaved pipeline, balance loss on (the tiny configs' ep_group /
# micro_batch), optimizer sharding on. The Pro MoE model gets 6 layers + 2 no-op layers: 2 slots per chunk.
PUBLISHED_SHAPE = {
    "ultra": ["parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
              "parallel_config.pipeline_stage=2", "parallel_config.pp_interleave_num=2",
              "parallel_config.micro_batch_num=4", "parallel_config.expert_parallel=2",
              "parallel_config.optimizer_shard=true"],
    "pro": ["model.num_layers=6", "parallel_config.noop_layers=2", "parallel_config.data_parallel=2",
            "parallel_config.model_parallel=2", "parallel_config.expert_parallel=2",
            "parallel_config.pipeline_stage=2", "parallel_config.pp_interleave_num=2",
            "parallel_config.micro_batch_num=4", "parallel_config.optimizer_shard=true"],
}


@pytest.mark.parametrize("rank", [0, 7])
@pytest.mark.parametrize("dispatch", ["expert_major", "ascend"])
@pytest.mark.parametrize("model", sorted(TINY))
def test_published_layout_shape_compiles_with_interleaved_pipeline(model, dispatch, rank, tmp_path):
    """Both token dispatchers: the expert-major buffer, and the all-to-all dispatch from MindSpore's fused Ascend ops
    (moe.dispatch_backend 'ascend': permute, AlltoAllV over EP, AllGatherV / ReduceScatterV over expert TP,
    GroupedMatmul, unpermute, inside one Morph per MoE layer; Pro MoE routes with the Ascend C MogeGating op)."""
    overrides = SMALL + PUBLISHED_SHAPE[model] + [f"model.moe.dispatch_backend={dispatch}"]
    if dispatch == "ascend":
        overrides.append("context.device_target=Ascend")
    report = compile_rank(os.path.join(ROOT, TINY[model]), rank, str(tmp_path), overrides)
    assert report.ok, "\n".join(report.mismatches)
    assert report.stage == rank // 4 and report.strategies > 0
    held = set(report.slices)
    assert ("model.embed_tokens.weight" in held) == (rank == 0)
    assert ("model.norm.weight" in held) == (rank == 7)
    # VPP2: each stage holds two chunks, not two neighbouring layer blocks
    from mindpangu.config import load_config
    from mindpangu.parallel.strategy import layer_stages

    cfg = load_config(os.path.join(ROOT, TINY[model]), overrides=overrides)
    mine = sorted({int(n.split(".")[2]) for n in held if n.startswith("model.layers.")})
    assert mine == sorted(i for i, (stage, _) in layer_stages(cfg).items() if stage == report.stage)
    assert len({chunk for i, (stage, chunk) in layer_stages(cfg).items() if stage == report.stage}) == 2
    # the dispatch that compiled: one Morph (named by its first parameter) per MoE layer of this stage, or none
    moe_layers = [i for i in mine if i >= cfg.model.first_k_dense_replace]
    morphs = sorted(int(op.split(".")[2]) for op in report.operators if op.startswith("Morph_model.layers."))
    assert morphs == (moe_layers if dispatch == "ascend" else [])
    assert report.ascend_c_ops == (["MogeGating"] if dispatch == "ascend" and model == "pro" else [])
    assert_balance_pooled_over_ep_group(model, report, overrides)
