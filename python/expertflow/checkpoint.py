"""Reading safetensors checkpoints a tensor at a time, straight from memory-mapped shards.

Only what the expert loader needs: the index of a (possibly sharded) checkpoint folder, each tensor's
dtype, shape and byte range, and zero-copy ``memoryview`` slices of the mapped file. After a range
has been copied out, :meth:`SafetensorsFile.release` drops its pages from this process, so streaming
a checkpoint through the pinned pool never holds more than the pool plus one tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CheckpointError", "TensorInfo", "SafetensorsFile", "Checkpoint"]

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint folder is missing files, or a tensor is absent or malformed."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` shard."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = path.open("rb")
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint shard {path}: {e.strerror}") from e
        try:
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(header_len))
        except (struct.error, ValueError) as e:
            self._file.close()
            raise CheckpointError(f"{path} is not a safetensors file ({e})") from e
        self.tensors: dict[str, TensorInfo] = {}
        base = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in DTYPES:
                raise CheckpointError(f"tensor '{name}' in {path} has unsupported dtype {meta['dtype']}")
            begin, end = meta["data_offsets"]
            self.tensors[name] = TensorInfo(name, path, DTYPES[meta["dtype"]], tuple(meta["shape"]), base + begin, end - begin)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else None

    def view(self, info: TensorInfo, offset: int = 0, nbytes: int | None = None) -> memoryview:
        """Zero-copy bytes of ``info`` (from ``offset``, ``nbytes`` long)."""
        nbytes = info.nbytes - offset if nbytes is None else nbytes
        start = info.start + offset
        return memoryview(self._map)[start : start + nbytes]

    def release(self, info: TensorInfo, offset: int = 0, nbytes: int | None = None) -> None:
        """Drops this process's pages of a range already copied out (they stay in the page cache)."""
        page = mmap.PAGESIZE
        begin = info.start + offset
        start = begin // page * page
        end = begin + (info.nbytes - offset if nbytes is None else nbytes)
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED") and end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()


class Checkpoint:
    """A checkpoint folder: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            shard_names = sorted(set(weight_map.values()))
            missing = [s for s in shard_names if not (self.folder / s).exists()]
            if missing:
                raise CheckpointError(
                    f"{index} lists shards that are missing from {self.folder}: {', '.join(missing)}; copy them there"
                )
        elif single.exists():
            shard_names = [single.name]
        else:
            raise CheckpointError(
                f"{self.folder} has neither model.safetensors nor model.safetensors.index.json; "
                "ExpertFlow loads safetensors checkpoints (convert others with transformers' save_pretrained)"
            )
        self.shards = {name: SafetensorsFile(self.folder / name) for name in shard_names}
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards.values():
            self.tensors.update(shard.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is not in the checkpoint at {self.folder}") from None

    def view(self, info: TensorInfo, offset: int = 0, nbytes: int | None = None) -> memoryview:
        return self.shards[info.file.name].view(info, offset, nbytes)

    def release(self, info: TensorInfo, offset: int = 0, nbytes: int | None = None) -> None:
        self.shards[info.file.name].release(info, offset, nbytes)

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
