"""Reading safetensors checkpoints a tensor at a time, straight from memory-mapped shards.

Only what the expert loader needs: the index of a (possibly sharded) checkpoint folder, each tensor's
dtype, shape and byte range, and zero-copy ``memoryview`` slices of the mapped file. After a range
has been copied out, :meth:`SafetensorsFile.release` drops its pages from this process, so streaming
a checkpoint through the pinned pool never holds more than the pool plus one tensor.
"""

from __future__ import annotations

import json
import math
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

    # safetensors itself refuses headers above 100 MB; a larger length is a damaged file, not a header.
    MAX_HEADER_BYTES = 100_000_000

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = path.open("rb")
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint shard {path}: {e.strerror}") from e
        try:
            self.tensors = self._read_header()
            size = os.path.getsize(path)
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> dict[str, TensorInfo]:
        """Every tensor's dtype, shape and byte range, checked against the file's size."""
        path, size = self.path, os.path.getsize(self.path)

        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{path} is not a valid safetensors file: {why}; re-download or re-save it")

        if size < 8:
            raise bad(f"it holds {size} bytes, fewer than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > min(size - 8, self.MAX_HEADER_BYTES):
            raise bad(f"its header length {header_len} is beyond the file's {size} bytes (a truncated or damaged file)")
        try:
            header = json.loads(self._file.read(header_len))
        except ValueError as e:
            raise bad(f"its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        base = 8 + header_len
        tensors: dict[str, TensorInfo] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype_name, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
                ok = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) and begin <= end
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise bad(f"tensor '{name}' has no valid dtype, shape and data_offsets")
            if dtype_name not in DTYPES:
                raise CheckpointError(f"tensor '{name}' in {path} has unsupported dtype {dtype_name}")
            nbytes = end - begin
            if nbytes != math.prod(shape) * DTYPES[dtype_name].itemsize:
                raise bad(f"tensor '{name}' spans {nbytes} bytes but {dtype_name} {list(shape)} needs {math.prod(shape) * DTYPES[dtype_name].itemsize}")
            if base + end > size:
                raise bad(f"tensor '{name}' ends at byte {base + end} but the file has {size} (a truncated file)")
            tensors[name] = TensorInfo(name, path, DTYPES[dtype_name], shape, base + begin, nbytes)
        return tensors

    def view(self, info: TensorInfo, offset: int = 0, nbytes: int | None = None) -> memoryview:
        """Zero-copy bytes of ``info`` (from ``offset``, ``nbytes`` long)."""
        nbytes = info.nbytes - offset if nbytes is None else nbytes
        start = info.start + offset
        if self._map is None:  # closed (an empty file never gets this far: its header check fails)
            raise CheckpointError(f"checkpoint shard {self.path} is closed")
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
            shard_names = self._shards_of(index)
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
        # Shards are keyed by path: an index may name shards in subfolders, whose file names can repeat.
        self.shards: dict[Path, SafetensorsFile] = {}
        try:
            for name in shard_names:
                shard = SafetensorsFile(self.folder / name)
                self.shards[shard.path] = shard
        except BaseException:
            self.close()
            raise
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards.values():
            self.tensors.update(shard.tensors)

    def _shards_of(self, index: Path) -> list[str]:
        """The shard files an index names: relative paths inside the folder (subfolders allowed)."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) and n for n in names):
                raise TypeError("shard names must be non-empty strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (a JSON object with a 'weight_map' of tensor "
                                  f"names to shard files): {e}") from None
        for name in names:
            # Lexically, not resolved: hub caches link shards to blobs elsewhere, which is fine.
            if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
                raise CheckpointError(f"{index} names shard '{name}' outside {self.folder}; shards must lie inside the "
                                      "checkpoint folder")
        return names

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is not in the checkpoint at {self.folder}") from None

    def view(self, info: TensorInfo, offset: int = 0, nbytes: int | None = None) -> memoryview:
        return self.shards[info.file].view(info, offset, nbytes)

    def release(self, info: TensorInfo, offset: int = 0, nbytes: int | None = None) -> None:
        self.shards[info.file].release(info, offset, nbytes)

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
