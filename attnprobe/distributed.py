"""Analysis over several processes: the ranks of a launcher share the prompts, rank 0 writes the report.

``torchrun`` and ``accelerate launch`` start one process per GPU (or CPU slot) and set
``WORLD_SIZE`` (processes in all), ``RANK`` (this one, over all machines), ``LOCAL_RANK`` (on this
machine: its GPU) and ``MASTER_ADDR``/``MASTER_PORT`` (where rank 0 listens). :func:`launch` reads
them and joins the process group (gloo on CPU, nccl on CUDA); without them it yields a one-process
:class:`Team`.

Why W processes give the one-process report: prompt i uses seed + i whichever rank takes it, and
every statistic is a sum over prompts (ring masses, key mass, map sums, per-prompt rows), so adding
the ranks' float64 sums (:meth:`Team.sum`) gives the same numbers up to float addition order.
:func:`share` splits P prompts into W contiguous blocks whose sizes differ by at most one (rank r
starts at r·q + min(r, P mod W), q = P // W; with W > P the last ranks get none and add zeros);
the same split serves ``attnprobe analyze --shard i/n`` without a launcher.

Errors: a rank that fails while the others wait in a collective would hang them, so each step
that can fail runs inside :meth:`Team.together` (no collective inside): at its end the ranks swap
outcomes and, if any failed, all raise — rank 0 its own error or a :class:`RankError` naming the
failed rank, the others a quiet RankError (the message is printed once). Collectives time out
after ``ATTNPROBE_DIST_TIMEOUT`` seconds (default 1800).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from attnprobe.core.cli import USER_ERRORS  # exit code 2
from attnprobe.core.errors import UserError

__all__ = ["Team", "RankError", "ShardError", "launch", "launcher_env", "rank_device", "share", "parse_shard"]


class ShardError(UserError):
    """A malformed ``--shard`` value."""


class RankError(RuntimeError):
    """Another rank failed. ``code``: its exit code (2 bad input, 1 otherwise); ``quiet`` on ranks > 0."""

    def __init__(self, message: str, code: int = 1, quiet: bool = False):
        super().__init__(message)
        self.code, self.quiet = code, quiet


def share(n_items: int, index: int, count: int) -> list[int]:
    """Indices of block ``index`` of ``count`` contiguous blocks of range(n_items), sizes differing by ≤ 1."""
    q, extra = divmod(n_items, count)
    start = index * q + min(index, extra)
    return list(range(start, start + q + (index < extra)))


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n, else :class:`ShardError`."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if m is None or not int(m[1]) < int(m[2]):
        raise ShardError(f"--shard must be i/n with 0 <= i < n (e.g. 0/2 and 1/2), got {text!r}")
    return int(m[1]), int(m[2])


def launcher_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun / accelerate; None outside a launcher or for one process."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun / accelerate launch)") from None
    if world > 1 and not (0 <= rank < world and local >= 0):
        raise UserError(f"RANK={rank} / LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    return (rank, world, local) if world > 1 else None


def rank_device(device: str, local_rank: int) -> str:
    """The device of one of several ranks: cuda → cuda:LOCAL_RANK (one GPU per process); cpu stays cpu."""
    if device == "cpu":
        return device
    if device != "cuda":
        raise UserError(f"--device {device} with several processes would put every rank on one GPU; use --device cuda "
                        "(rank r takes cuda:LOCAL_RANK) or cpu")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this machine; "
                        "start at most one process per GPU")
    return f"cuda:{local_rank}"


def _timeout() -> datetime.timedelta:
    text = os.environ.get("ATTNPROBE_DIST_TIMEOUT", "1800")
    seconds = float(text) if re.fullmatch(r"\s*\d+(\.\d*)?\s*", text) else 0.0
    if not seconds > 0:
        raise UserError(f"ATTNPROBE_DIST_TIMEOUT={text!r}: give a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


@dataclass(frozen=True)
class Team:
    """This process's place among the ranks of one analysis, and the collectives they share."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl"; None for one process
    device: str = "cpu"  # this rank's torch device (nccl collectives run there)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Element-wise sums over ranks (one float64 all_reduce); every rank gets them, shapes kept."""
        arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
        if self.world_size == 1 or not arrays:
            return arrays
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays])).to(self.device)
        dist.all_reduce(flat)
        ends = np.cumsum([a.size for a in arrays])
        return [part.reshape(a.shape) for part, a in zip(np.split(flat.cpu().numpy(), ends[:-1]), arrays)]

    def all_gather(self, obj) -> list:
        """Every rank's (picklable, small) ``obj``, by rank, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's ``obj``, by rank, on rank 0 only (None elsewhere): images travel this way."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    @contextlib.contextmanager
    def together(self):
        """Run a block that may fail on some ranks only; afterwards all ranks fail or none does."""
        if self.world_size == 1:
            yield
            return
        error = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised again
            error = exc
        mine = None if error is None else (2 if isinstance(error, USER_ERRORS) else 1, _line(error))
        failed = [(rank, o) for rank, o in enumerate(self.all_gather(mine)) if o is not None]
        if not failed:
            return
        rank, (code, line) = failed[0]
        if not self.is_main:
            raise RankError(f"rank {rank}: {line}", code, quiet=True) from error
        if error is not None:
            raise error
        raise RankError(f"rank {rank}: {line}", code)


def _line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if isinstance(exc, USER_ERRORS) else f"unexpected {type(exc).__name__}: {text}"


@contextlib.contextmanager
def launch(device: str = "cpu"):
    """``with launch(device) as team:`` — join the launcher's process group (or run alone without one).

    ``device``: the user's resolved device (cpu, cuda, cuda:N); under a launcher each rank takes
    :func:`rank_device`. The group is left on exit if this call created it.
    """
    env = launcher_env()
    if env is None:
        yield Team(device=device)
        return
    rank, world, local = env
    dev = rank_device(device, local)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=_timeout())
    try:
        yield Team(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                   backend=str(dist.get_backend()), device=dev)
    finally:
        if owned:
            dist.destroy_process_group()
