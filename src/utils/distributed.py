"""Which process writes: in a multi-process (DDP) run, summaries and reports come from global rank zero only."""

from __future__ import annotations

import os

# set by Lightning's launcher (LOCAL_RANK, NODE_RANK), torchrun (RANK) or SLURM (SLURM_PROCID)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def launched_as_rank_zero() -> bool:
    """True unless this process was started as a non-zero rank, judged from the environment.

    Valid before the trainer sets up its process group; after that ``trainer.is_global_zero`` is the answer.
    """
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in RANK_VARIABLES)
