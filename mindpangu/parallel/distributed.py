"""Multi-process data parallel under ``msrun`` (works on CPU through MindSpore's own collectives): process
group set-up and the all-reduces the training step needs."""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops


def launched_workers() -> int:
    """Worker processes of the job this process belongs to (msrun sets MS_WORKER_NUM; 1 when not launched)."""
    return int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1)


def init_data_parallel() -> Tuple[int, int]:
    """(rank, world): joins the process group when launched with several workers, else (0, 1)."""
    if launched_workers() <= 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


class CrossRankSum(nn.Cell):
    """x -> the sum of x over all ranks (AllReduce)."""

    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        return self.all_reduce(x)


def sum_over_ranks(values: np.ndarray, op: CrossRankSum) -> np.ndarray:
    return op(ms.Tensor(np.asarray(values, np.float32))).asnumpy()


def msrun_command(workers: int, script_args: str, port: int = 8118, log_dir: str = "msrun_log",
                  local_workers: int = 0, master_addr: str = "127.0.0.1", node_rank: str = "") -> str:
    """The msrun launch line: ``workers`` processes in all, ``local_workers`` (default all) on this host; on a
    multi-node mesh every node runs it with its own ``node_rank`` (msrun starts ``python`` from PATH: put the
    environment's bin directory first)."""
    local = local_workers or workers
    rank = f"--node_rank={node_rank} " if node_rank != "" else ""
    return (f"msrun --worker_num={workers} --local_worker_num={local} --master_addr={master_addr} "
            f"--master_port={port} {rank}--log_dir={log_dir} --join=True {script_args}")
