"""Expert parallelism over the GPUs of one host: each process (one per GPU) caches a share of the
experts, every process runs the same tokens, and two small collectives per MoE layer (who holds
which expert; the combine) keep them in step.

Launched with ``torchrun --nproc-per-node N`` (or ``expertflow generate|serve --nproc-per-node N``,
which starts the processes itself): ``from_pretrained(..., distributed=True)`` joins the process
group (NCCL on GPUs, gloo on the CPU), one process per GPU.

- **Ownership.** Expert ``e`` of every layer belongs to rank ``e % world_size``: the owner fills it
  into the pool and is the first choice to copy it. An expert is copied to the rank that holds it or
  was dealt it, so the per-GPU caches hold (all but briefly) disjoint shares and act as one cache of
  ``world_size`` times the slots.
- **Balanced links** (:func:`assign`). Static ownership alone leaves a link idle whenever a layer's
  misses fall on one rank (at batch 1 with top-2 of 8 experts, 3 layers in 7). So at each layer the
  ranks exchange which of the chosen experts they hold (one small all_gather) and every rank derives
  the same assignment: an expert some rank holds runs there, and the misses are dealt out so each
  link copies as few as possible, the owner first on ties. Any rank can copy any expert because the
  pool is shared. An expert held by another GPU is computed there, never copied between GPUs.
- **Balanced prefetches** (:func:`deal_prefetches`). The exchange carries each rank's whole
  residency map, and every rank splits the step's plan (the same plan everywhere) the same way: a
  held expert stays with its holder, the rest go to the links in turns, in due order.
- **Replicated tokens.** Attention and every other resident weight are replicated, and every rank
  runs the same batch, so dispatching tokens to experts costs nothing: each rank already holds every
  token. (Splitting attention would save GPU memory, not time, at the batch sizes offloading serves.)
- **Combine.** Each rank writes its experts' weighted outputs into ``[tokens, k, hidden]`` (zeros where
  another rank's expert sits) and one ``all_reduce`` sums them: every entry has exactly one non-zero
  contributor, so the sum is exact. Each rank then adds a token's ``k`` outputs in ascending expert
  order, as the one-process path does, so the result is bit-identical to one process.
- **One pool per host.** Rank 0 creates the pinned pool in shared memory; the others map the same
  memory and page-lock it for their own GPU (``ExpertPool(shared=True)``). Each rank reads its own
  experts from the checkpoint into it, in parallel. Host memory does not grow with the GPUs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import numpy as np
import torch

__all__ = ["ExpertShard", "assign", "deal_prefetches", "init_distributed", "launched_by_torchrun", "launch_ranks", "cli_rank", "gather_stats"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _ENV)


@dataclass(frozen=True)
class ExpertShard:
    """This process's share of the experts: ``rank`` of ``world_size``, over process ``group``."""

    rank: int
    world_size: int
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group
    # gloo, with a timeout of days: a serving follower waits there for rank 0's next pass, however
    # long the server idles (the default group's watchdog would end it after minutes)
    control: Any = None
    owns_group: bool = False  # init_distributed created the default group (not the caller's script)

    def owner(self, num_experts: int) -> np.ndarray:
        """``[num_experts]``: each expert's owning rank."""
        return np.arange(num_experts) % self.world_size

    def owned(self, num_experts: int) -> np.ndarray:
        """``[num_experts]`` bool: the experts this rank prefetches (and loads into the pool)."""
        return self.owner(num_experts) == self.rank

    def owned_ids(self, num_experts: int) -> list[int]:
        return np.flatnonzero(self.owned(num_experts)).tolist()

    def holders(self, held: np.ndarray, device: torch.device) -> np.ndarray:
        """``held [L, E]`` bool: which experts this rank's cache holds -> ``[world, L, E]`` bool for every
        rank (one all_gather of a byte per expert and one transfer to the host)."""
        import torch.distributed as dist

        mine = torch.from_numpy(held.astype(np.uint8)).to(device)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.group)
        return torch.stack(everyone).cpu().numpy().astype(bool)

    def combine(self, contributions: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """``contributions [T, k, H]``: this rank's weighted expert outputs at each (token, rank slot),
        zeros elsewhere; ``routing [T, k]`` expert ids -> ``[T, H]``, the sum over every rank, added
        per token in ascending expert order (the order of the one-process path)."""
        import torch.distributed as dist

        dist.all_reduce(contributions, group=self.group)
        order = torch.argsort(routing, dim=1, stable=True)
        ordered = contributions.gather(1, order[..., None].expand_as(contributions))
        final = torch.zeros_like(ordered[:, 0])
        for j in range(ordered.shape[1]):  # k adds, as many as the one-process path makes
            final += ordered[:, j]
        return final

    def broadcast(self, value: str) -> str:
        """Rank 0's string on every rank."""
        return cast(str, self.broadcast_object(value))

    def broadcast_object(self, value: object) -> object:
        """Rank 0's (picklable) ``value`` on every rank, over the control group."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.control)

    def finish(self) -> None:
        """Ends a run every rank completed. Where ExpertFlow created the process group, waits for
        every rank and tears the group down; a caller's own group is left to the caller. Without the wait, rank 0 (which hosts the rendezvous store) could exit
        while another rank's NCCL watchdog still polls the store, which prints a stack of warnings."""
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()


def assign(layer: int, experts: list[int], owner: np.ndarray, holders: np.ndarray) -> np.ndarray:
    """The rank that computes each of ``layer``'s chosen ``experts`` (ascending ids), the same on every
    rank. ``owner [E]``: each expert's owning rank; ``holders [world, L, E]``: which rank holds which.

    The rules of :func:`deal_prefetches`, for the misses of one layer: an expert some rank holds runs
    there (its owner if it holds it, else the lowest such rank); the misses go one at a time, in id
    order, to the rank with the fewest copies so far, the owner first on ties, then the lowest rank:
    no link copies two while another copies none."""
    return deal_prefetches(np.full(len(experts), layer), np.asarray(experts, dtype=np.int64), owner, holders)


def deal_prefetches(layers: np.ndarray, experts: np.ndarray, owner: np.ndarray, holders: np.ndarray) -> np.ndarray:
    """The rank that brings in each of a plan's prefetches ``(layers[i], experts[i])`` (``[n]``, in
    due order), the same on every rank. ``holders [world, L, E]``: which rank holds which expert.

    An expert some rank holds stays there (its owner if it holds it, else the lowest such rank), so
    one expert never travels over two links. The rest are dealt out one at a time, in due order, to
    the rank with the fewest copies so far, the owner first on ties, then the lowest rank: the links
    take turns, and no link idles while another has two copies queued."""
    world = holders.shape[0]
    owners = owner[experts]
    held_by = holders[:, layers, experts]  # [world, n]
    ranks = np.where(held_by[owners, np.arange(len(experts))], owners, np.argmax(held_by, axis=0))
    copies = np.zeros(world, dtype=np.int64)
    dealt: dict[tuple[int, int], int] = {}  # a plan may name one expert twice: it goes one way
    for i in np.flatnonzero(~held_by.any(axis=0)).tolist():  # the copies, dealt in due order
        pair = (int(layers[i]), int(experts[i]))
        if pair in dealt:
            ranks[i] = dealt[pair]
            continue
        fewest = np.flatnonzero(copies == copies.min())
        ranks[i] = dealt[pair] = owners[i] if owners[i] in fewest else fewest[0]
        copies[ranks[i]] += 1
    return ranks


def init_distributed(use_gpu: bool) -> tuple[ExpertShard, torch.device]:
    """Joins (or reuses) the process group torchrun set up: NCCL with one GPU per process, gloo on the
    CPU. Returns this process's shard and device."""
    import torch.distributed as dist

    if not dist.is_initialized() and not launched_by_torchrun():
        missing = ", ".join(name for name in _ENV if name not in os.environ)
        raise RuntimeError(f"distributed=True needs a torchrun launch (missing {missing}); run "
                           "torchrun --nproc-per-node N ..., or expertflow generate|serve --nproc-per-node N")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if local_world and world and local_world != world:
        raise RuntimeError(f"ExpertFlow spreads experts over the GPUs of one host; this launch has {world} processes "
                           f"over {world // local_world} hosts. Use --nnodes 1")
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else dist.get_rank()  # one host
    if use_gpu:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"process {local_rank} has no GPU: {torch.cuda.device_count()} are visible; "
                               "use at most that many processes per node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_gpu else "gloo", device_id=device if use_gpu else None)
    control = dist.new_group(backend="gloo", timeout=timedelta(days=30))
    return ExpertShard(dist.get_rank(), dist.get_world_size(), control=control, owns_group=owns_group), device


def open_shared_pool(shard: ExpertShard, num_layers: int, num_experts: int, tensors, backend):
    """The host's one pool: rank 0 creates it in shared memory, the others map it. A failure on
    rank 0 reaches every rank as an error instead of a wait for a pool that never comes."""
    from .runtime import ExpertFlowError, ExpertPool

    created, failure = None, None
    if shard.rank == 0:
        try:
            created = ExpertPool.uniform(num_layers, num_experts, tensors, backend=backend, shared=True)
        except ExpertFlowError as e:
            failure = e
    path = shard.broadcast((created.shared_path or "") if created is not None else f"error: {failure}")
    if failure is not None:
        raise failure
    if path.startswith("error: "):
        raise ExpertFlowError(f"rank 0 could not create the shared expert pool: {path[7:]}")
    return created or ExpertPool.uniform(num_layers, num_experts, tensors, backend=backend, attach=path)


_LAUNCHED = "EXPERTFLOW_RANK_OF_CLI"  # set by launch_ranks for the processes it starts


def cli_rank() -> int | None:
    """This process's rank when :func:`launch_ranks` started it, else None."""
    return int(os.environ["RANK"]) if os.environ.get(_LAUNCHED) == "1" else None


def launch_ranks(nproc_per_node: int, cli_args: list[str]) -> int | None:
    """From the CLI: runs ``expertflow CLI_ARGS`` as ``nproc_per_node`` processes of one host, in the
    environment torchrun would give them, and returns their exit status; or returns None inside such
    a process (the caller goes on as one rank; ranks other than 0 print nothing).

    The processes are started here rather than by torchrun so that a failing rank's one-line error
    is the whole report, and Ctrl-C or SIGTERM stop every rank quietly. When one rank fails, the
    others are stopped and its status is returned."""
    import signal
    import socket
    import subprocess
    import sys

    rank = cli_rank()
    if rank is not None:
        if rank != 0:
            import logging

            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process)
            logging.getLogger().setLevel(logging.ERROR)
        return None
    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, _LAUNCHED: "1", "WORLD_SIZE": str(nproc_per_node), "LOCAL_WORLD_SIZE": str(nproc_per_node),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": os.environ.get(
                "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))}
    sys.stdout.flush()
    sys.stderr.flush()
    ranks = [subprocess.Popen([sys.executable, "-m", "expertflow.cli", *cli_args],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc_per_node)]

    received: list[int] = []

    def stop(signum, frame) -> None:
        received.append(signum)
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = 0
        while any(p.poll() is None for p in ranks):
            failed = [p.returncode for p in ranks if p.returncode not in (None, 0)]
            if failed and not status:  # one rank failed: the others would wait for it forever
                status = failed[0]
                for p in ranks:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.1)
        if received:  # stopped by Ctrl-C or SIGTERM: the shell's status for it, whatever the ranks said
            return 128 + received[0]
        codes = [128 - c if c < 0 else c for c in (p.returncode for p in ranks)]  # killed by a signal: 128 + it
        return (128 - status if status < 0 else status) or next((c for c in codes if c), 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def gather_stats(shard: ExpertShard, stats: dict) -> dict:
    """Every rank's engine stats: ``ranks`` (one dict each), the counters summed (``num_slots``: all
    GPUs' slots), ``stall_ms`` the longest rank's."""
    import torch.distributed as dist

    from .offload import hit_ratio  # offload imports this module

    everyone: list = [None] * shard.world_size
    dist.all_gather_object(everyone, stats, group=shard.group)
    total = {k: sum(s[k] for s in everyone) for k, v in stats.items() if isinstance(v, (int, float)) and k != "hit_ratio"}
    total["hit_ratio"] = hit_ratio(total)
    total["stall_ms"] = max(s["stall_ms"] for s in everyone)  # the ranks stall at the same time, not in turn
    return {**stats, **total, "ranks": everyone, "world_size": shard.world_size}
