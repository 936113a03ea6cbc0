"""torch.distributed under ``torchrun``, as a few helpers that do nothing in a plain process.

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init_from_env` joins the process group when
``WORLD_SIZE > 1``. Before that, :func:`rank` and :func:`world_size` read the same variables, so "only rank 0
writes files" holds from the first line of a command, not only once the group exists. Without those variables
every helper is a no-op and collectives return their input.

Assumes one node or a shared file system: rank 0 writes the run directory and every rank reads it on resume.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lowbit.errors import LowbitError

# Ranks wait at a barrier for the slowest one's last job (an ALPS candidate, a frontier point), which can take
# long on real data; a crashed rank makes torchrun stop the others, so a generous timeout hides no failure.
DEFAULT_TIMEOUT_S = 6 * 3600  # raise it with LOWBIT_DIST_TIMEOUT (seconds) when one job may take longer


def _timeout() -> timedelta:
    raw = os.environ.get("LOWBIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise LowbitError(f"LOWBIT_DIST_TIMEOUT={raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise LowbitError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if initialized() else (_env_int("RANK", 0) if world_size() > 1 else 0)


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); True when running on several ranks."""
    if initialized():
        return world_size() > 1
    if world_size() <= 1:
        return False
    if not dist.is_available():
        raise LowbitError("this PyTorch build has no torch.distributed; run without torchrun")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LowbitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if device.index is not None:
            raise LowbitError(f"--device {device} names one GPU, but under torchrun each rank takes the GPU of its "
                              "LOCAL_RANK: use --device cuda")
        local = _env_int("LOCAL_RANK", 0)
        if local >= torch.cuda.device_count():
            raise LowbitError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s); start "
                              "torchrun with --nproc-per-node at most that")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=_timeout())
    atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    if initialized():
        dist.destroy_process_group()


def finish() -> None:
    """Leave the process group together after a command succeeded: a barrier, then the teardown. A rank that
    tore down its gloo pairs while another still used them has aborted at exit ("terminate called without an
    active exception"); after an error only the at-exit teardown runs, since the other ranks may never arrive."""
    if initialized():
        if world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (and returned); moved to the backend's device if needed."""
    if not initialized() or world_size() == 1:
        return tensor
    work = tensor.to(_comm_device())
    dist.all_reduce(work)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s, in place (bool tensors too, which gloo cannot send)."""
    if not initialized() or world_size() == 1:
        return tensor
    work = tensor.to(_comm_device(), torch.uint8 if tensor.dtype == torch.bool else tensor.dtype)
    dist.broadcast(work, src)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled)."""
    if not initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled)."""
    if not initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


__all__ = ["all_gather_object", "all_reduce_sum", "barrier", "broadcast_", "broadcast_object", "finish",
           "init_from_env", "initialized", "is_main", "rank", "world_size"]
