"""The disk weight sync's write path: host copies of the weights, laid out as safetensors shards, written in
parallel.

Measured on one H200 (Qwen3-VL-8B architecture, bf16, 16.3 GiB; ENVIRONMENT.md): `export_state` +
`save_pretrained` took 16-25 s per sync, all of it while the learner waited, and a single-threaded `save_file`
of host tensors 7-10 s; a GPU -> pinned host copy of every tensor 0.32 s. So the learner waits only for that
copy: `HostShards` holds one flat host buffer per set of tensors (allocated once, pinned with
`cudaHostRegister`, which pins exactly its size where torch's pinned allocator rounds up to a power of two),
each tensor a view into it, laid out as the data sections of safetensors shards. A file is then its header and
one slice of the buffer, written with `os.pwrite` in 256 MiB chunks by a thread pool (the GIL is released in
the write): no serialisation, no copy. Files are overwritten in place (no truncation), so a sync into tmpfs
reuses the pages of the last one.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHARD_BYTES = 1 << 30  # a shard's data, at most (one tensor larger than this gets a shard of its own)
CHUNK_BYTES = 256 << 20  # one pwrite
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def write_threads() -> int:
    """Threads that write files: the host's cores, at most 16 (tmpfs writes stop scaling beyond that)."""
    return max(1, min(16, os.cpu_count() or 1))


@dataclass
class Shard:
    file: str
    start: int  # where its data starts in the buffer
    nbytes: int
    header: bytes = b""  # the file's first bytes: u64 length + JSON, padded to 8 bytes as safetensors does
    names: list[str] = field(default_factory=list)


class HostShards:
    """Host copies of a fixed set of tensors (`specs`: name -> (dtype, shape)), as safetensors shards
    `<prefix>-00001-of-0000N.safetensors`; one buffer allocated here, once."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], prefix: str, pin: bool):
        def nbytes(name):
            dtype, shape = specs[name]
            return torch.Size(shape).numel() * dtype.itemsize

        groups: list[list[str]] = [[]]
        size = 0
        for name in specs:  # in model order: a layer's tensors stay together
            if groups[-1] and size + nbytes(name) > SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes(name)
        self.shards: list[Shard] = []
        self.offsets: dict[str, int] = {}
        start = 0
        for k, names in enumerate(groups):
            # wider elements first: every tensor's offset is then a multiple of its element size (a typed
            # view)
            names = sorted(names, key=lambda n: -specs[n][0].itemsize)
            shard = Shard(f"{prefix}-{k + 1:05d}-of-{len(groups):05d}.safetensors", start, 0, names=names)
            header = {"__metadata__": {"format": "pt"}}
            for name in names:
                dtype, shape = specs[name]
                header[name] = {"dtype": DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [shard.nbytes, shard.nbytes + nbytes(name)]}
                self.offsets[name] = start + shard.nbytes
                shard.nbytes += nbytes(name)
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            shard.header = struct.pack("<Q", len(text)) + text
            self.shards.append(shard)
            start += shard.nbytes + (-shard.nbytes % 64)
        self.specs = specs
        self.nbytes = sum(s.nbytes for s in self.shards)
        self.buffer = torch.empty(max(start, 1), dtype=torch.uint8)  # [bytes]
        self.pinned = pin and _register(self.buffer)
        self.views = {name: self.buffer[o: o + nbytes(name)].view(specs[name][0]).view(specs[name][1])
                      for name, o in self.offsets.items()}

    @property
    def files(self) -> list[str]:
        return [s.file for s in self.shards]

    def copy_from(self, tensors) -> None:
        """Copy `(name, tensor)` pairs into their views; returns once every copy has landed (the learner may
        change its weights as soon as this returns)."""
        cuda = False
        with torch.no_grad():
            for name, t in tensors:
                cuda |= t.is_cuda
                self.views[name].copy_(t.detach(), non_blocking=True)
        if cuda:
            torch.cuda.synchronize()

    def write(self, directory: Path, threads: int | None = None) -> int:
        """Write every shard into `directory` (in place: same names, same sizes each time); returns bytes
        written."""
        data = self.buffer.numpy()  # [bytes], shares the buffer's memory
        fds, jobs = [], []
        try:
            for s in self.shards:
                fd = os.open(directory / s.file, os.O_WRONLY | os.O_CREAT, 0o644)
                fds.append(fd)
                os.ftruncate(fd, len(s.header) + s.nbytes)  # (a no-op when the file is the same size already)
                jobs.append((fd, 0, memoryview(s.header)))
                for o in range(0, s.nbytes, CHUNK_BYTES):
                    n = min(CHUNK_BYTES, s.nbytes - o)
                    jobs.append((fd, len(s.header) + o, memoryview(data[s.start + o: s.start + o + n])))
            with ThreadPoolExecutor(threads or write_threads()) as pool:
                list(pool.map(lambda job: _pwrite_all(*job), jobs))
        finally:
            for fd in fds:
                os.close(fd)
        return sum(len(s.header) + s.nbytes for s in self.shards)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False


def _pwrite_all(fd: int, offset: int, view: memoryview) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _register(buffer: torch.Tensor) -> bool:
    """Page-lock `buffer` for fast, asynchronous GPU -> host copies; False where that is not possible."""
    if not torch.cuda.is_available():
        return False
    try:
        err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    except (RuntimeError, AttributeError):
        return False
    return int(err) == 0


def write_index(directory: Path, weight_map: dict[str, str]) -> None:
    """`model.safetensors.index.json` naming the files (and tensors) the server's next reload reads: vLLM 0.32
    loads only the files a shard index names (`filter_duplicate_safetensors_files`)."""
    tmp = directory / "model.safetensors.index.json.tmp"
    tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    os.replace(tmp, directory / "model.safetensors.index.json")
