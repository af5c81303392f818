"""Process-group set-up and the named device mesh.

`ParallelDims` turns `pp x dp_replicate x dp_shard x cp x tp` into one `DeviceMesh` whose dimension
names are what the `apply_*` functions ask for ("dp_shard", "tp", ...). tp is the innermost
dimension so a TP group stays inside a node (NVLink); pp is the outermost so the slow inter-node
links carry only the small pipeline activations (the Megatron/torchtitan ordering).

Nothing here is global: the mesh is created once per `Trainer` and passed to whoever needs it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from loomtrain.config import ParallelConfig, resolve_degrees
from loomtrain.errors import ConfigError

_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size and the device it computes on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group
    owns_process_group: bool  # True if we created the default group (and must destroy it)
    # The job's key-value store (torchrun's), when this process created the group: components
    # that must agree without a collective that could hang (the exit agreement) use it.
    store: dist.Store | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto", timeout_s: float = 1800.0, *,
                     host_collectives: bool = False) -> DistEnv:
    """Join the job torchrun started (NCCL on CUDA, gloo on CPU), or run alone if there is none.

    `host_collectives` (offload.params on CUDA): gloo serves CPU tensors beside NCCL, because the
    gradient norm of host-held DTensor gradients is reduced over the (CUDA) mesh's groups.

    Reuses an existing default process group, so tests and notebooks can build several Trainers
    in one process group.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(requested_device, local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device,
                       dist.get_backend(), owns_process_group=False, store=_job_store(timeout_s))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and host_collectives:
            backend = "cpu:gloo,cuda:nccl"
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store = attempt_store(store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, backend,
                       owns_process_group=True, store=store)
    return DistEnv(0, 0, 1, device, None, owns_process_group=False)


def _job_store(timeout_s: float) -> dist.Store | None:
    """A client of the job's store (torchrun's, at MASTER_ADDR:MASTER_PORT) for a process group
    the caller created; None when the job has no such store."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return attempt_store(dist.TCPStore(host, int(port), is_master=False,
                                           timeout=datetime.timedelta(seconds=timeout_s)))
    except (RuntimeError, ValueError):
        return None


def attempt_store(store: dist.Store) -> dist.Store:
    """The job's store seen through a prefix per torchelastic attempt: the agent's store outlives
    a restart (`--max-restarts`), and without the prefix the restarted group's gloo would read the
    dead group's addresses (and its exit agreements) and fail to connect."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"loomtrain/attempt_{attempt}", store)


@dataclass(frozen=True)
class ParallelDims:
    """Resolved parallel degrees; `build_mesh` makes the named DeviceMesh for them."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ep: int = 1  # expert parallel: carved from dp_shard, not a factor of the world size

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        return cls(**resolve_degrees(cfg, world_size))

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Ranks that see different data (the batch is split across them)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks a parameter is sharded over: dp_shard, and cp (context ranks hold the same weights)."""
        return self.dp_shard * self.cp

    def build_mesh(self, device_type: str) -> "Mesh | None":
        """The world as a mesh with every dimension named, plus flattened views:
        "dp" (dp_replicate x dp_shard: data split), "dp_shard_cp" (the FSDP shard group) and
        "dp_cp" (gradient reduction group). None when running as a single process."""
        if not dist.is_initialized():
            return None
        sizes = [getattr(self, name) for name in _ORDER]
        root = init_device_mesh(device_type, sizes, mesh_dim_names=_ORDER)
        flat = {"dp": root["dp_replicate", "dp_shard"]._flatten("dp"),
                "dp_shard_cp": root["dp_shard", "cp"]._flatten("dp_shard_cp"),
                "dp_cp": root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")}
        if self.ep > 1:
            flat.update(self._expert_meshes(device_type))
        return Mesh(root, flat)

    def _expert_meshes(self, device_type: str) -> dict[str, DeviceMesh]:
        """Expert parallelism carves dp_shard into dp_shard_mod_ep x ep, ep innermost (adjacent
        ranks exchange tokens). The two live in one mesh of their own: an expert weight is a DTensor
        sharded over "ep", and FSDP shards it again over "experts_fsdp", which FSDP allows only
        for dimensions of the same root mesh. "experts_fsdp" spans every rank holding the same
        experts: dp_shard_mod_ep x cp (a row's context-parallel ranks hold the same weights), and
        with dp_replicate > 1 the 2-D (dp_replicate, that) mesh of HSDP. cp comes before ep so
        that dp_shard_mod_ep and cp are adjacent, which DTensor needs to flatten them when it
        redistributes (the gradient norm); an ep group need not match the data layout, it is any
        set of ranks that together hold all the experts."""
        names = ("pp", "dp_replicate", "dp_shard_mod_ep", "cp", "ep", "tp")
        sizes = [self.pp, self.dp_replicate, self.dp_shard // self.ep, self.cp, self.ep, self.tp]
        experts = init_device_mesh(device_type, sizes, mesh_dim_names=names)
        shard = "dp_shard_mod_ep"
        if self.cp > 1:
            experts["dp_shard_mod_ep", "cp"]._flatten("dp_shard_mod_ep_cp")
            shard = "dp_shard_mod_ep_cp"
        fsdp = experts["dp_replicate", shard] if self.dp_replicate > 1 else experts[shard]
        return {"ep": experts["ep"], "dp_shard_mod_ep": experts["dp_shard_mod_ep"], "experts_fsdp": fsdp}


class Mesh:
    """The named world mesh. Flattened dimensions are kept here rather than sliced out of the
    root mesh again, which torch deprecates; everything else is the root's own slicing."""

    def __init__(self, root: DeviceMesh, flat: dict[str, DeviceMesh]):
        self.root = root
        self.flat = flat

    def __getitem__(self, names):
        if isinstance(names, str) and names in self.flat:
            return self.flat[names]
        if names == ("dp_replicate", "dp_shard_cp") and self.root["cp"].size() == 1:
            return self.root["dp_replicate", "dp_shard"]  # the same ranks, without a flattened slice
        return self.root[names]

    @property
    def device_type(self) -> str:
        return self.root.device_type


def dp_coordinates(mesh: "Mesh | None") -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel ranks: which slice of the batch it reads."""
    if mesh is None:
        return 0, 1
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()
