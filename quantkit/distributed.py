"""Data-parallel calibration under ``torchrun``: the ranks share the calibration batches.

Batch b (of ``--nsamples`` windows cut into forward batches) belongs to rank b mod world size.
Each rank runs every layer on its own batches only; before each solve the statistics that span
all tokens are combined: Hessian sums, mean-|x| sums and token counts are summed. The solves of a true-sequential group are spread over the ranks
(module j on rank j mod size) and their results broadcast, so every rank holds the same
quantized layer. Rank 0 alone writes the export.

The export equals the single-process one: the batches are the same, every rank computes the
same per-batch partial sums, and partial sums are added in float64, where sums of float32
values are exact unless their magnitudes differ by more than 2^29.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from quantkit.algos.quantizer import QuantizedWeight
from quantkit.progress import console


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` data-parallel processes (size 1: no torch.distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether batch (or module) ``index`` is this rank's."""
        return index % self.size == self.rank

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of t over the ranks (float64 for Hessians)."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def share(self, owner: int, q: QuantizedWeight | None, loss: float | None, like: torch.Tensor) -> tuple[QuantizedWeight, float | None]:
        """The quantized weight (and GPTQ loss) that rank ``owner`` computed for a Linear whose weight
        is ``like`` [N, K], on every rank."""
        if self.size == 1:
            return q, loss
        n, k = like.shape
        if self.rank == owner:
            codes, scales, zeros = (t.float().contiguous() for t in (q.codes, q.scales, q.zeros))
            header = torch.tensor([q.bits, q.group_size, scales.shape[1], -1.0 if loss is None else loss],
                                  dtype=torch.float64, device=like.device)
        else:
            header = torch.zeros(4, dtype=torch.float64, device=like.device)
        dist.broadcast(header, owner)
        bits, group, groups = int(header[0]), int(header[1]), int(header[2])
        if self.rank != owner:
            codes = torch.empty(n, k, device=like.device)
            scales = torch.empty(n, groups, device=like.device)
            zeros = torch.empty(n, groups, device=like.device)
        for t in (codes, scales, zeros):
            dist.broadcast(t, owner)
        g_idx = (torch.arange(k, device=like.device) // group).int()
        shared_loss = None if header[3].item() < 0 else header[3].item()
        return QuantizedWeight(codes, scales, zeros, g_idx, bits, group), shared_loss


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """The data-parallel world torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK),
    else size 1; and this process's compute device (``cuda`` becomes ``cuda:LOCAL_RANK``).

    Uses NCCL for CUDA devices and gloo otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = World(dist.get_rank(), dist.get_world_size())
    if not world.is_main:
        console.quiet = True  # rank 0 reports; errors still reach stderr through the CLI
    return world, device
