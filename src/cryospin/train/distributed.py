"""Data-parallel training over :mod:`torch.distributed` (``torchrun``, Slurm).

Launched with ``torchrun --nproc_per_node N -m cryospin.cli.main reconstruct ...`` (or under
Slurm, see ``docs/distributed.md``), every process runs the same trainer on a **shard** of the
particles. The design makes ``W`` processes compute the same training run as one process, up
to float round-off:

- **Same global batches.** Every rank draws the epoch's permutation from the same seeded
  generator, so all ranks see the same sequence of global batches as a single process. Rank
  ``r`` keeps the particles ``i`` of each batch with ``i mod W == r`` (:meth:`Shard.owns`): it
  **owns** those particles for the whole run, and only it touches their pose-table rows (the
  global search and the pose steps are per row, hence local).
- **Same gradients.** A rank's objective is its share of the global batch mean,
  ``W · Σ_{i ∈ rank} ℓ_i / B`` (:meth:`Shard.objective`); averaging the gradients over the
  ranks (DDP for the encoder, :meth:`Shard.average_gradients` for the volume) gives exactly the
  gradient of ``Σ_i ℓ_i / B``, the single-process loss, whatever the split of the batch.
- **Same batch normalisation.** The encoder's batch norm layers are replaced by
  :class:`GlobalBatchNorm2d` (statistics summed over the ranks with a differentiable
  all-reduce; works with gloo on CPU, unlike :class:`torch.nn.SyncBatchNorm`), so each layer
  normalises with the statistics of the global batch. Its ``state_dict`` is that of
  :class:`torch.nn.BatchNorm2d`.
- **Rank 0 writes.** Maps, metrics, pose track, ``config.yaml``, the checkpoint and the final
  outputs. The pose table is gathered to rank 0 once per epoch (:meth:`Shard.gather_pose_table`)
  for the checkpoint, which therefore holds the full table and resumes with any ``W``.
- **Sharded data.** The trainer gives :func:`cryospin.train.memory.plan_and_load` the shard:
  each rank reads, preprocesses and holds (or streams) only the particles it owns
  (``TrainingData.holding(shard.owned(N))``), so the data's memory and preprocessing per rank
  are about ``N / W``; its epochs yield the rank's part of each global batch directly.

When not launched distributed (``WORLD_SIZE`` unset or 1) none of this is used and the
trainer's code paths are those of a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.nn.parallel import DistributedDataParallel

from cryospin.errors import InputError
from cryospin.pose import PoseTable
from cryospin.train.batches import Batch

if dist.is_available():
    # Imported before any process group exists, on purpose: its functions take
    # ``group=group.WORLD`` as a default argument, evaluated when the module is first imported.
    # Imported after init_process_group (torch.optim's first optimiser imports torch._dynamo,
    # which imports it), those defaults kept ten references to the default group, so
    # destroy_process_group could not free it: gloo's worker threads ran on until interpreter
    # exit, which then now and then aborted ("terminate called without an active exception",
    # SIGABRT after the outputs were written). Imported now, the defaults are None.
    import torch.distributed.nn  # noqa: F401

__all__ = [
    "WorldInfo",
    "Shard",
    "GlobalBatchNorm2d",
    "world_from_env",
    "backend_for",
    "device_for_rank",
    "init_distributed",
    "teardown_distributed",
    "process_group",
    "synchronise",
    "convert_batch_norm",
    "wrap_encoder",
    "local_batches",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in the job.

    Attributes
    ----------
    rank : int
        Global rank, ``0 .. world_size − 1``.
    local_rank : int
        Rank on this node (the GPU index with CUDA).
    world_size : int
        Number of processes (1: not distributed).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def world_from_env(environ: Mapping[str, str] | None = None) -> WorldInfo:
    """The job layout from ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (set by ``torchrun``).

    Without them, a Slurm step of several tasks (``srun``, with ``MASTER_ADDR`` and
    ``MASTER_PORT`` exported) is read from ``SLURM_NTASKS``, ``SLURM_PROCID``,
    ``SLURM_LOCALID``. Otherwise: a single process, ``WorldInfo()``.

    Raises
    ------
    InputError
        When the variables are not integers or are inconsistent.
    """
    env = os.environ if environ is None else environ
    size = _env_int(env, "WORLD_SIZE")
    if size is not None:
        rank = _env_int(env, "RANK")
        local = _env_int(env, "LOCAL_RANK")
        rank = 0 if rank is None else rank
        local = rank if local is None else local
    elif (_env_int(env, "SLURM_NTASKS") or 1) > 1 and "MASTER_ADDR" in env \
            and "MASTER_PORT" in env:
        size = _env_int(env, "SLURM_NTASKS") or 1
        rank = _env_int(env, "SLURM_PROCID") or 0
        local = _env_int(env, "SLURM_LOCALID") or 0
    else:
        return WorldInfo()
    if size < 1 or not 0 <= rank < size or local < 0:
        raise InputError(f"inconsistent distributed environment: rank {rank} of world size "
                         f"{size}, local rank {local}")
    return WorldInfo(rank=rank, local_rank=local, world_size=size)


def backend_for(device: torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_for_rank(device: torch.device, world: WorldInfo) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA device in a distributed job; ``device`` otherwise."""
    if device.type != "cuda" or not world.distributed:
        return device
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise InputError(f"local rank {world.local_rank} has no GPU (this node has {count}); "
                         f"use --nproc_per_node <= {count}")
    return torch.device("cuda", world.local_rank)


def init_distributed(world: WorldInfo, device: torch.device) -> bool:
    """Join the process group (``env://`` rendezvous); True when this call created it.

    Does nothing (False) for a single process or when a group already exists.
    """
    if not world.distributed or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise InputError("torch.distributed is not available in this PyTorch build")
    env = os.environ
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise InputError("distributed run without MASTER_ADDR/MASTER_PORT: launch with torchrun "
                         "(or export them under srun)")
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=world.rank,
                            world_size=world.world_size)
    logger.info("joined process group: rank %d of %d (%s, %s)", world.rank, world.world_size,
                backend, device)
    return True


def teardown_distributed(created: bool, *, synchronise: bool) -> None:
    """Leave the process group if :func:`init_distributed` created it.

    ``synchronise`` (the run ended normally on this rank): wait at a barrier first, so that no
    rank destroys its gloo pairs while another still talks to it (rank 0 writes the checkpoint
    after the others are done; a rank leaving early was seen to abort with "terminate called
    without an active exception"). False after an error, where the other ranks may never arrive.
    """
    if created and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(world: WorldInfo, device: torch.device) -> Iterator[None]:
    """Hold the process group for a workflow of several runs (``--halves``, ``--starts``):
    joined on entry (a rendezvous: every rank has checked the run folder before rank 0 writes
    in it), left on exit (after a barrier when the block ended normally). Each run's
    :func:`cryospin.train.fit.fit` then finds the group and keeps it. Nothing for one
    process, or when a group exists already (an outer workflow's)."""
    created = init_distributed(world, device)
    ended_normally = False
    try:
        yield
        ended_normally = True
    finally:
        teardown_distributed(created, synchronise=ended_normally)


def synchronise(world: WorldInfo) -> None:
    """Wait until every rank gets here (a barrier; nothing for one process): in a workflow,
    between rank 0's writes and the other ranks' reads of the same files."""
    if world.distributed and dist.is_available() and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- batch norm


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; its adjoint is again the sum over the ranks (of the gradients)."""

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: Tensor) -> Tensor:  # noqa: ARG004
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:  # noqa: ARG004
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` whose training statistics are those of the global batch.

    The per-channel sums ``Σ x`` (with the element count) and then ``Σ (x − μ)²`` are summed
    over the ranks by an all-reduce whose backward is again an all-reduce, so the gradient is
    that of batch norm over the union of the ranks' inputs. A rank with an empty share
    contributes zeros. Eval mode (running statistics) and the state dict are those of the
    parent class; with no process group it is the parent.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = (0, 2, 3)
        x_in = x
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in >= float32
        count = torch.full((1,), float(x.shape[0] * x.shape[2] * x.shape[3]),
                           dtype=x.dtype, device=x.device)
        first = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))  # (C + 1,)
        total = first[-1].detach()
        if float(total) < 2:
            raise ValueError("batch norm needs more than one value per channel when training")
        mean = first[:-1] / total  # (C,)
        centred = x - mean[None, :, None, None]  # (B, C, H, W)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / total  # (C,) biased
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        out = out.to(x_in.dtype)
        tracked = self.num_batches_tracked  # None exactly when running_mean is
        if self.track_running_stats and self.running_mean is not None and tracked is not None:
            with torch.no_grad():
                tracked.add_(1)
                m = (1.0 / float(tracked) if self.momentum is None
                     else self.momentum)
                unbiased = var.detach() * (total / (total - 1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)  # type: ignore[union-attr]
        return out


def convert_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every :class:`torch.nn.BatchNorm2d` replaced (in place) by a
    :class:`GlobalBatchNorm2d` sharing its parameters and buffers; returns ``module``."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                    affine=child.affine,
                                    track_running_stats=child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batch_norm(child)
    return module


def wrap_encoder(encoder: nn.Module, device: torch.device) -> nn.Module:
    """The encoder for distributed training: global batch norm, in
    :class:`~torch.nn.parallel.DistributedDataParallel` (which broadcasts rank 0's weights).

    The returned wrapper shares ``encoder``'s parameters; save ``encoder.state_dict()``.
    """
    convert_batch_norm(encoder)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(encoder, device_ids=ids)


# --------------------------------------------------------------------------- shard


@dataclass(frozen=True)
class Shard:
    """This rank's share of the particles and the collectives of the trainer.

    Particle ``i`` belongs to rank ``i mod world_size``.
    """

    world: WorldInfo

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def rank(self) -> int:
        return self.world.rank

    def owns(self, indices: Tensor) -> Tensor:
        """Boolean mask `(B,)`: which of ``indices`` `(B,)` belong to this rank."""
        return indices.remainder(self.world_size) == self.rank

    def owned(self, num_particles: int) -> Tensor:
        """This rank's particle indices `(n_r,)` int64, increasing."""
        return torch.arange(self.rank, num_particles, self.world_size, dtype=torch.int64)

    def local_batches(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, int]]:
        """``(this rank's part of the batch, global batch size)`` for each global batch.

        ``batches`` yields :class:`~cryospin.train.data.Batch` objects; the part keeps the
        rows this rank owns, in the batch's order (possibly none). Batches of sharded data
        (``global_size`` set: already this rank's part) pass through after a check.

        Raises
        ------
        ValueError
            When a part of a sharded batch holds particles this rank does not own.
        """
        for batch in batches:
            if batch.global_size is not None:
                if not bool(self.owns(batch.indices).all()):
                    raise ValueError(f"rank {self.rank} of {self.world_size} was given "
                                     "particles of another rank (data sharded differently)")
                yield batch, int(batch.global_size)
                continue
            keep = self.owns(batch.indices)
            part = dataclasses.replace(
                batch, indices=batch.indices[keep], images=batch.images[keep],
                hartley=batch.hartley[keep], ctf=None if batch.ctf is None else batch.ctf[keep],
            )
            yield part, int(batch.indices.numel())

    def objective(self, per_image_loss: Tensor, global_count: int) -> Tensor:
        """``W · Σ ℓ_i / B``: averaged over the ranks, the gradient of the global batch mean."""
        return per_image_loss.sum() * (self.world_size / global_count)

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """All-reduce the ``.grad`` of ``params`` (in place) to their mean over the ranks."""
        params = list(params)
        for p in params:  # every rank must send the same layout
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_sum(self, values: Tensor) -> Tensor:
        """Sum of ``values`` over the ranks (a new tensor; float64 on CPU for statistics)."""
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        out = values.detach().to(device=device, dtype=torch.float64).clone()
        dist.all_reduce(out)
        return out.cpu()

    def gather_rows(self, full: Tensor) -> Tensor | None:
        """Rank 0: ``full`` `(N, ...)` with every rank's own rows; other ranks: None.

        Each rank sends its rows ``r, r + W, ...`` of its copy of ``full`` (the rows it owns).
        """
        n, W = int(full.shape[0]), self.world_size
        per = -(-n // W)
        mine = full[self.rank::W]
        pad = torch.zeros((per, *full.shape[1:]), dtype=full.dtype, device=full.device)
        pad[: mine.shape[0]] = mine
        parts = [torch.empty_like(pad) for _ in range(W)] if self.world.is_main else None
        dist.gather(pad, parts, dst=0)
        if parts is None:
            return None
        out = torch.empty_like(full)
        for r, part in enumerate(parts):
            rows = len(range(r, n, W))
            out[r::W] = part[:rows]
        return out

    def gather_pose_table(self, table: PoseTable) -> PoseTable | None:
        """Rank 0: the full :class:`~cryospin.pose.PoseTable` (every rank's rows and Adam
        state); other ranks: None. A collective: every rank must call it."""
        n = len(table)
        state = table.state_dict()
        full: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n:
                full[key] = self.gather_rows(value)
            else:
                full[key] = value
        if not self.world.is_main:
            return None
        return PoseTable.from_state_dict(full)

    def expand_rows(self, values: Tensor, num_particles: int, fill: Tensor) -> Tensor:
        """`(N, ...)`: ``values`` `(n_r, ...)` at this rank's rows, ``fill`` `(...)` elsewhere."""
        out = fill.to(values).expand(num_particles, *values.shape[1:]).clone()
        out[self.owned(num_particles).to(values.device)] = values
        return out

    def barrier(self) -> None:
        dist.barrier()


def local_batches(batches: Iterable[Batch], shard: Shard | None) -> Iterator[tuple[Batch, int]]:
    """``(batch, its size)`` for each batch, or, with a ``shard``, this rank's part of each
    global batch and the global size (:meth:`Shard.local_batches`)."""
    if shard is not None:
        return shard.local_batches(batches)
    return ((batch, int(batch.indices.numel())) for batch in batches)
