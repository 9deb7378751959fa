"""Compile the training step for a real Ascend parallel layout on this CPU, as one simulated rank.

The stock MindSpore wheel ships the Ascend plugin but not the CANN libraries it links. ``make_fake_cann.sh``
generates stub libraries (every missing symbol returns 0; compile-only, never used to execute) into a cache; with
them, ``MS_SIMULATION_LEVEL=0`` makes MindSpore use a dummy communicator and compile the semi-auto-parallel
graph for ``RANK_ID`` of ``RANK_SIZE`` ranks. The graph is then dropped (the step "returns" a dummy 0).

What it proves: the strategies ``mindpangu.parallel.parallelize`` generates are accepted by MindSpore's parallel
compiler for the layout (redistributions, pipeline send/receive, interleaved pipelines, the sharded optimizer) with
the whole training loss (LM, MTP, balance and z terms), and each parameter's compiled slice on that rank equals
``predicted_slices``. What it cannot: memory figures or numerics (levels 1-3 need the real
CANN toolkit).
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..fsutil import cache_root, replace_dir, staging_dir

if TYPE_CHECKING:
    from ..config.schema import TrainConfig

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "parallel", "make_fake_cann.sh")


def stub_cann(python: str = sys.executable, log=print) -> str:
    """The stub CANN directory for this MindSpore, built once into the cache (about a minute)."""
    import mindspore

    final = os.path.join(cache_root(), "fake_cann", mindspore.__version__)
    if all(os.path.isfile(os.path.join(final, "latest", *f)) for f in (("lib64", "libge_runner.so"),
                                                                       ("include", "acl", "acl_base.h"))):
        return final
    log(f"building stub CANN libraries for mindspore {mindspore.__version__} into {final} ...")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = staging_dir(final)
    subprocess.run(["bash", SCRIPT, python, tmp], check=True, stdout=subprocess.DEVNULL)
    replace_dir(tmp, final)
    return final


@dataclass
class CompileReport:
    config: str
    rank: int
    layout: str
    stage: int
    slices: Dict[str, List[int]]           # compiled: parameter -> slice shape on this rank
    predicted: Dict[str, List[int]]        # mindpangu.parallel.predicted_slices
    strategy_file: str
    strategies: int                        # operator strategies in the strategy file
    seconds: float
    operators: List[str] = field(default_factory=list)    # the strategy file's operators (e.g. Morph_<first param>)
    ascend_c_ops: List[str] = field(default_factory=list)  # Ascend C custom ops whose launcher was compiled
    all_reduces: Dict[str, List[List[int]]] = field(default_factory=dict)  # see :func:`all_reduce_groups`
    mismatches: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def compare(slices: Dict[str, List[int]], predicted: Dict[str, List[int]]) -> List[str]:
    out = [f"{n}: compiled {slices[n]}, predicted {predicted[n]}" for n in sorted(set(slices) & set(predicted))
           if list(slices[n]) != list(predicted[n])]
    out += [f"{n}: compiled on this rank, predicted on another stage" for n in sorted(set(slices) - set(predicted))]
    out += [f"{n}: predicted on this rank, not compiled here" for n in sorted(set(predicted) - set(slices))]
    return out


_IR_NODE = re.compile(r"^\s*(%\d+)\(\S+\) = [\w.]+\(.*\{instance name: ([^}]+)\}")
_IR_ALL_REDUCE = re.compile(r"^\s*%\d+\(\S+\) = AllReduce\((%\d+)\).*group_ranks: \"([\d-]+)\"")


def all_reduce_groups(ir_file: str) -> Dict[str, List[List[int]]]:
    """The AllReduces MindSpore inserted after named primitives, from its ``step_parallel_end`` IR dump: primitive
    instance name (e.g. ``group_sum``) -> the distinct rank lists reduced over on this rank (the world group and
    reductions after redistribution ops are left out)."""
    names: Dict[str, str] = {}
    out: Dict[str, set] = {}
    with open(ir_file) as f:
        for line in f:
            node = _IR_NODE.match(line)
            if node:
                names[node.group(1)] = node.group(2)
            reduce = _IR_ALL_REDUCE.match(line)
            if reduce and reduce.group(1) in names:
                out.setdefault(names[reduce.group(1)], set()).add(tuple(int(r) for r in reduce.group(2).split("-")))
    return {name: sorted(map(list, groups)) for name, groups in out.items()}


def mindformers_recipe(path: str, overrides: Optional[List[str]] = None) -> Tuple[dict, "TrainConfig"]:
    """A mindformers YAML (``tools/to_mindformers.py``'s dialect) with ``key.path=value`` overrides applied to its
    own keys (``model.model_config.hidden_size=64``), and our TrainConfig for it (``from_mindformers``)."""
    import yaml

    from ..config import ConfigError
    from ..config.core import build_section
    from ..config.loader import parse_override
    from ..config.schema import TrainConfig
    from ..integrations.mindformers_recipe import from_mindformers

    with open(path) as f:
        recipe = yaml.safe_load(f)
    for item in overrides or []:
        key, value = parse_override(item)
        *sections, leaf = key.split(".")
        node = recipe
        for part in sections:
            if not isinstance(node.get(part), dict):
                raise ConfigError(key, f"{path} has no section {part!r} there", where=f"override '{item}'")
            node = node[part]
        if leaf not in node:  # the recipe's network ignores unknown model keys with a warning: refuse typos here
            raise ConfigError(key, f"{path} has no such key", where=f"override '{item}'",
                              allowed=", ".join(sorted(node)))
        node[leaf] = value
    return recipe, build_section(TrainConfig, from_mindformers(recipe), "", {})


def compile_rank(config: str, rank: int, out_dir: str, overrides: Optional[List[str]] = None,
                 timeout: int = 900, log=print, mindformers: bool = False) -> CompileReport:
    """Compile ``config``'s training step as simulated ``rank`` in a child process; the report compares slices.

    ``mindformers``: ``config`` is a mindformers recipe (``yaml_configs/mindformers/``) and the step is the one
    mindformers' own ``Trainer`` builds after its ``build_context`` (its train-step wrapper and pipeline cell, our
    registered network laid out by ``parallelize``); run it with the interpreter of the mindformers environment
    (mindformers 1.9 pins mindspore 2.9: the stubs are built for whichever MindSpore runs this)."""
    from ..config import load_config
    from ..parallel.plan import Layout

    os.makedirs(out_dir, exist_ok=True)
    if mindformers:
        import yaml

        recipe, cfg = mindformers_recipe(config, overrides)
        child_config = os.path.join(os.path.abspath(out_dir), "recipe.yaml")
        with open(child_config, "w") as f:
            yaml.safe_dump(recipe, f, sort_keys=False)
        child = ["--mindformers", child_config, str(rank), os.path.abspath(out_dir)]
    else:
        cfg = load_config(config, overrides=overrides or [])
        child = [os.path.abspath(config), str(rank), os.path.abspath(out_dir)] + list(overrides or [])
    layout = Layout.from_config(cfg)
    if not 0 <= rank < layout.world:
        raise ValueError(f"--rank {rank}: the layout {layout.short()} has ranks 0..{layout.world - 1}")
    stubs = stub_cann(log=log)
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(stubs, "latest", "lib64"),
               ASCEND_OPP_PATH=os.path.join(stubs, "latest", "opp"),
               PYTHONPATH=os.pathsep.join([os.path.join(stubs, "py")] + [p for p in sys.path if p]),
               MS_SIMULATION_LEVEL="0", RANK_SIZE=str(layout.world), RANK_ID=str(rank), GLOG_v="3",
               # the graph after MindSpore's parallel pass (about 6 MB at tiny size), for the collectives it inserted
               MS_DEV_SAVE_GRAPHS="1", MS_DEV_DUMP_IR_PASSES="step_parallel_end",
               MS_DEV_SAVE_GRAPHS_PATH=os.path.join(os.path.abspath(out_dir), "ir"))
    args = [sys.executable, "-m", "mindpangu.train.sim_compile"] + child
    run = subprocess.run(args, env=env, cwd=out_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=timeout)
    result = os.path.join(out_dir, f"rank{rank}.json")
    log_file = os.path.join(out_dir, f"rank{rank}.log")
    lines = [line for line in run.stdout.splitlines() if "Dynamically load symbol" not in line]
    with open(log_file, "w") as f:
        f.write("\n".join(lines))
    if run.returncode != 0 or not os.path.isfile(result):
        errors = [i for i, line in enumerate(lines) if line.split(":")[0].endswith(("Error", "Exception"))]
        what = "\n".join(lines[errors[-1]: errors[-1] + 12]) if errors else "\n".join(lines[-20:])
        raise RuntimeError(f"simulated compile of {config} as rank {rank} failed (exit {run.returncode}; full log "
                           f"{log_file}):\n{what}")
    with open(result) as f:
        data = json.load(f)
    report = CompileReport(config=config, rank=rank, layout=layout.short(), **data)
    report.mismatches = compare(report.slices, report.predicted)
    return report


def _worker(config: str, rank: int, out_dir: str, overrides: List[str]) -> None:
    """Child process: Ascend target, dummy communicator, semi-auto parallel; compile one training step."""
    import time

    import numpy as np
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore import nn
    from mindspore.communication import init

    from ..config import load_config
    from ..models import build_model
    from ..parallel.plan import Layout
    from ..parallel.strategy import auto_parallel_context, parallelize, predicted_slices
    from .step import TotalLoss

    start = time.time()
    cfg = load_config(config, overrides=overrides)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("Ascend")
    init()
    strategy_file = os.path.join(out_dir, f"strategy_rank{rank}.ckpt")
    ms.set_auto_parallel_context(**auto_parallel_context(cfg), strategy_ckpt_config={"save_file": strategy_file})
    if cfg.model.moe.dispatch_backend != "ascend":  # the dispatchers parallelize shards
        cfg.model.moe.dispatch_backend = "expert_major"
    cfg.model.norm_backend = cfg.model.attention_backend = "reference"
    model = parallelize(build_model(cfg.model, seed=cfg.seed), cfg)
    predicted = {k: list(v) for k, v in predicted_slices(model, cfg, rank).items()}  # before compiling slices them

    class PipelinedLoss(TotalLoss):
        # one graph reused per micro-batch (mindformers' pipelines use it throughout): MindSpore requires it for
        # interleaved pipelines, and without it a Morph (the ascend dispatch) on a later stage fails to compile
        # ("The pointer[abs] is null" in AddMonadParameterForFuncGraph)
        @ms.lazy_inline
        def __init__(self, *args):
            super().__init__(*args)

    p = cfg.parallel_config
    net = (PipelinedLoss if p.pipeline_stage > 1 else TotalLoss)(model, cfg)
    micro = p.micro_batch_num if p.pipeline_stage > 1 else 1
    if p.pipeline_stage > 1:
        net = nn.PipelineCell(net, micro)
    batch = cfg.runner_config.batch_size * p.data_parallel * micro
    tokens = np.zeros((2 * batch, cfg.train_dataset.seq_length + 1), np.int32)
    data = ds.NumpySlicesDataset({"tokens": tokens}, shuffle=False).batch(batch)
    optimizer = nn.AdamWeightDecay(net.trainable_params(), 1e-3)
    train = ms.train.Model(net, optimizer=optimizer)
    train.train(1, data, dataset_sink_mode=False)
    _compiled(rank, out_dir, train.train_network, {n for n, _ in model.parameters_and_names()}, predicted,
              time.time() - start, rank // Layout.from_config(cfg).stage_size, strategy_file)


def _compiled(rank: int, out_dir: str, train_network, names, predicted, seconds: float, stage: int,
              strategy_file: str) -> None:
    """Write the child's report: the compiled slices of the model's parameters and the strategy file's contents."""
    from mindspore.train.node_strategy_pb2 import ParallelStrategyMap

    slices = {name: [int(n) for n in layout[2]] for name, layout in train_network.parameter_layout_dict.items()
              if name in names}
    strategy_map = ParallelStrategyMap()
    with open(strategy_file, "rb") as f:
        strategy_map.ParseFromString(f.read())
    meta = os.path.join(out_dir, "custom_kernel_meta", f"rank_{rank}")
    launchers = sorted(d for d in (os.listdir(meta) if os.path.isdir(meta) else [])
                       if os.path.isdir(os.path.join(meta, d)))
    dumps = glob.glob(os.path.join(out_dir, "ir", f"rank_{rank}", "step_parallel_end_*.ir"))
    out = {"stage": stage, "slices": slices, "predicted": predicted, "strategy_file": strategy_file,
           "strategies": len(strategy_map.parallel_strategy_item), "seconds": round(seconds, 1),
           "operators": sorted(item.node_name for item in strategy_map.parallel_strategy_item),
           "ascend_c_ops": launchers, "all_reduces": all_reduce_groups(dumps[0]) if dumps else {}}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f, indent=1)


def _mindformers_worker(recipe: str, rank: int, out_dir: str) -> None:
    """Child process (mindformers environment): mindformers' build_context and Trainer on the recipe, one step, as
    simulated ``rank``; the probe reads our network's predicted slices before the compile and the compiled ones
    after."""
    import time

    import numpy as np
    import mindspore.dataset as ds
    from mindspore.train import Callback

    from mindformers import MindFormerConfig, Trainer, build_context

    from ..integrations import mindformers as mfi
    from ..parallel.plan import Layout
    from ..parallel.strategy import predicted_slices

    start = time.time()
    cfg = MindFormerConfig(recipe)
    cfg.output_dir = out_dir
    cfg.callbacks = []  # MFLossMonitor all-reduces its FLOPs count, which a simulated rank returns as a plain 0
    build_context(cfg)
    strategy_file = os.path.join(out_dir, "strategy", f"ckpt_strategy_rank_{rank}.ckpt")  # where mindformers saves it

    class Probe(Callback):
        def on_train_begin(self, run_context):
            net = next(c for _, c in run_context.original_args().train_network.cells_and_names()
                       if isinstance(c, (mfi.PanguUltraMoEForCausalLM, mfi.PanguProMoEForCausalLM)))
            self.cfg = mfi.train_config(net.config)
            self.names = {n for n, _ in net.network.parameters_and_names()}
            self.predicted = {k: list(v) for k, v in predicted_slices(net.network, self.cfg, rank).items()}

        def on_train_step_end(self, run_context):
            args = run_context.original_args()
            _compiled(rank, out_dir, args.train_network, self.names, self.predicted, time.time() - start,
                      rank // Layout.from_config(self.cfg).stage_size, strategy_file)
            run_context.request_stop()

    p = cfg.parallel_config
    batch = cfg.runner_config.batch_size * p.data_parallel * (p.micro_batch_num if p.pipeline_stage > 1 else 1)
    tokens = np.zeros((2 * batch, cfg.model.model_config.seq_length + 1), np.int32)
    data = ds.NumpySlicesDataset({"input_ids": tokens}, shuffle=False).batch(batch)
    Trainer(args=cfg, train_dataset=data, callbacks=[Probe()]).train()


if __name__ == "__main__":
    if sys.argv[1] == "--mindformers":
        _mindformers_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:])
