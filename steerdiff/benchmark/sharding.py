"""Splitting the samples of a cell across processes (``accelerate launch``) and meeting again.

The samples of a cell are cut into fixed chunks of ``batch_size`` (chunk k holds samples k B .. (k+1) B - 1);
chunk k belongs to process k mod world_size.  Chunk boundaries and per-sample seeds do not depend on the
number of processes, so neither do the samples.  Each process writes its chunks to the run folder; after a
barrier the main process reads them all (the run folder must be visible to every process, as a shared
filesystem is on a multi-node cluster).

    accelerate launch --multi_gpu --num_processes 8 -m steerdiff benchmark --config configs/benchmark/x.yaml
    accelerate launch --multi_gpu --num_processes 2 -m steerdiff benchmark --config ... device=cpu   # 2 CPU processes

``accelerate launch`` starts several processes through torchrun only with ``--multi_gpu`` (its ``--cpu`` flag
starts one process unless MPI is set up); on a machine without GPUs, or with ``device: cpu``, the processes
join a gloo (CPU) process group.  ``torchrun --nproc_per_node 2 -m steerdiff benchmark ...`` works the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Shard:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    _state: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        return chunk % self.world_size == self.rank

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()


def current_shard(cpu: bool = False) -> Shard:
    """This process's place in an ``accelerate launch`` (or a single plain process)."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    return Shard(rank=state.process_index, world_size=state.num_processes, device=state.device, _state=state)


def chunk_bounds(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of the fixed chunks of a cell."""
    return [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
