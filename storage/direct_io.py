"""Large write-once files (checkpoint weights, optimizer state) written around the page cache.

A G-OPD run writes a checkpoint every iteration: the weights (4 bytes a parameter) and the AdamW
state (8 more). Through the page cache each byte is copied by the kernel into pages it must first
find, and on a VM whose spare memory lives with the host (virtio balloon / free page reporting)
those pages are new to the guest: buffered writes cost ~4 ms of kernel CPU per MB there, about
1.7 s per 400 MB on the critical path of every update. With `O_DIRECT` the device reads straight
from a reused, page-aligned buffer: ~0.2 s per 400 MB and almost no CPU, and the run's checkpoints
stop evicting what the page cache holds for reading (prompts, rollouts, teacher weights).

`DirectFile` is a write-only file object (`write`, `flush`, `close`) that does this, and falls back
to ordinary buffered writes where the filesystem refuses `O_DIRECT` (tmpfs, some network mounts,
non-Linux systems): same bytes, only slower. It fsyncs on close. A piece that starts on a block
boundary of the file and of memory goes to the device straight from the caller's memory, without
the copy into the staging buffer: `page_aligned` gives tensors such memory, `write_safetensors` and
`write_torch` lay files out so that their tensors start on block boundaries. `write_safetensors`
writes a safetensors file through it, `write_torch` a `torch.save` file; `safetensors_chunks` gives
the same bytes again (to hash them from memory instead of reading the file back).
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.utils.serialization as torch_serialization

ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned to the device's block
STAGING_BYTES = 8 << 20  # one reused, page-aligned buffer: 8 MiB per direct write call
O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux only

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


class DirectFile:
    """Write-only, sequential file that bypasses the page cache where it can; fsynced on close.

    Bytes are gathered in a page-aligned staging buffer and written in whole `STAGING_BYTES`
    blocks with `O_DIRECT`; the last partial block goes through the page cache (it is not aligned).
    There are two staging buffers: a full one is written by a writer thread while the caller fills
    the other, so the copy and the device's writes run at the same time. A piece whose memory and
    file offset are both block-aligned skips the copy: its whole blocks go to the device from the
    caller's memory, `zero_copy_bytes` of them.
    `direct_bytes` counts the bytes written with `O_DIRECT` (0 where the filesystem refused it).
    """

    def __init__(self, path: str | Path) -> None:
        self.direct_bytes, self.zero_copy_bytes = 0, 0
        self._offset = 0  # bytes handed to the device so far (written or in flight)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(path, flags | O_DIRECT, 0o644)
            self.direct = bool(O_DIRECT)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            self._fd, self.direct = os.open(path, flags, 0o644), False
        self._buffers = [mmap.mmap(-1, STAGING_BYTES) for _ in range(2)]
        self._views = [memoryview(buffer) for buffer in self._buffers]
        self._view, self._filled = self._views[0], 0
        self._writer: ThreadPoolExecutor | None = None  # started with the first full buffer
        self._pending: Future | None = None  # the write in flight, of the buffer not being filled

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, data) -> int:
        """Append `data` (any contiguous buffer); returns its length in bytes."""
        source = memoryview(data).cast("B")
        done = self._write_in_place(source)
        while done < len(source):
            take = min(len(source) - done, STAGING_BYTES - self._filled)
            piece = source[done:done + take]
            self._view[self._filled:self._filled + take] = piece
            self._filled += take
            done += take
            if self._filled == STAGING_BYTES:
                self._hand_over()
        return len(source)

    def _write_in_place(self, source: memoryview) -> int:
        """Write the whole blocks of `source` from its own memory where that can be done; returns how many bytes."""
        whole = len(source) - len(source) % ALIGN
        if (not self.direct or not whole or (self._offset + self._filled) % ALIGN
                or np.frombuffer(source, np.uint8).ctypes.data % ALIGN):
            return 0
        self._wait()  # what was staged before it lands first
        if self._filled:  # whole blocks (the file offset is aligned): written now, then the buffer starts afresh
            self._write_out(self._view, self._filled)
            self._offset, self._filled = self._offset + self._filled, 0
        self._write_out(source[:whole], whole)
        if self.direct:  # else the filesystem refused O_DIRECT at the first write: counted as buffered
            self.zero_copy_bytes += whole
        self._offset += whole
        return whole

    def flush(self) -> None:
        """Nothing to do before `close`: whole blocks are written as they fill (torch.save calls this)."""

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self._wait()
            aligned = self._filled - self._filled % ALIGN
            if aligned:
                self._write_out(self._view, aligned)
            self._set_direct(False)  # the unaligned tail goes through the page cache
            self._write_out(self._view[aligned:self._filled], self._filled - aligned)
            os.fsync(self._fd)
        finally:
            try:
                self._wait()  # an error above may leave a write in flight: it ends before the file closes
            except OSError:
                pass
            if self._writer is not None:
                self._writer.shutdown()
            os.close(self._fd)
            self._fd = -1
            for view, buffer in zip(self._views, self._buffers):
                try:
                    view.release()
                    buffer.close()
                except BufferError:  # a failed write's traceback still holds a slice: the collector frees it
                    pass

    def _hand_over(self) -> None:
        """The full staging buffer goes to the writer thread; filling goes on in the other one."""
        self._wait()  # the other buffer's write: at most one in flight
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gopd-direct-write")
        self._pending = self._writer.submit(self._write_out, self._view, STAGING_BYTES)
        self._offset += STAGING_BYTES
        self._view = self._views[1] if self._view is self._views[0] else self._views[0]
        self._filled = 0

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the writer's error here

    def _write_out(self, view: memoryview, count: int) -> None:
        """Write the first `count` bytes of `view` (the writer thread's work, and `close`'s)."""
        written = 0
        while written < count:
            try:
                step = os.write(self._fd, view[written:count])
                written += step
                self.direct_bytes += step if self.direct else 0
            except OSError as err:
                if err.errno != errno.EINVAL or not self.direct:
                    raise
                self._set_direct(False)  # the filesystem took the flag at open but refuses the write

    def _set_direct(self, on: bool) -> None:
        if not self.direct or on:
            return
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~O_DIRECT)
        self.direct = False


def safetensors_chunks(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Iterator:
    """The bytes of a safetensors file holding `tensors`, in order: the header, then each tensor's data.

    The header is padded with spaces to ALIGN, so the data starts block-aligned (readers take the data's
    start from the header length), and the tensors whose size is a whole number of blocks come first, so
    each of them starts on a block boundary too (`DirectFile` writes them from their own memory where that
    is aligned as well: `page_aligned`); within each part, as the safetensors library orders them (dtype
    size, largest first, then name). The same tensors give the same bytes, so a file's hash can be taken
    again later from memory (`gopd_core.models.save_model`).
    """
    def nbytes(name: str) -> int:
        return tensors[name].numel() * tensors[name].element_size()

    order = sorted(tensors, key=lambda name: (nbytes(name) % ALIGN != 0, -tensors[name].element_size(), name))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"safetensors cannot store {name!r} of dtype {tensor.dtype}")
        size = nbytes(name)
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGN)
    yield len(encoded).to_bytes(8, "little") + encoded
    for name in order:
        tensor = tensors[name].detach()
        if tensor.numel():
            yield tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write `tensors` as a safetensors file at `path` through `DirectFile`; returns the bytes written with O_DIRECT.

    A checkpoint's hash is taken from the same bytes in memory (`safetensors_chunks`), not from the file.
    """
    with DirectFile(path) as sink:
        for chunk in safetensors_chunks(tensors, metadata):
            sink.write(chunk)
    return sink.direct_bytes


def write_torch(obj: object, path: str | Path) -> int:
    """`torch.save(obj)` at `path` through `DirectFile`; returns the bytes written with O_DIRECT.

    Without the zip records' CRC-32: `torch.load` never checks it, and computing it cost 0.17 s of CPU per
    GB (the AdamW state of a 100M-parameter model is 0.8 GB), taken from the stages this write overlaps.
    Each tensor's bytes start on a block boundary of the file (torch pads the zip records to
    `storage_alignment`, 64 bytes by default), so `page_aligned` tensors go out without a copy.
    Both settings are process-wide in torch, so they are restored right after.
    """
    save_config = torch_serialization.config.save
    crc32, alignment = torch.serialization.get_crc32_options(), save_config.storage_alignment
    torch.serialization.set_crc32_options(False)
    save_config.storage_alignment = ALIGN
    try:
        with DirectFile(path) as sink:
            torch.save(obj, sink)
    finally:
        torch.serialization.set_crc32_options(crc32)
        save_config.storage_alignment = alignment
    return sink.direct_bytes


def page_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` if its storage starts on a page, else a copy in page-aligned memory (CPU tensors; others as they are).

    torch's CPU allocator aligns to 64 bytes only, so `DirectFile` would copy such a tensor into its staging
    buffer before the device reads it. A copy here costs the same once; kept (the model's parameters, the
    AdamW state), the tensor is written from its own memory at every checkpoint after. The memory is an
    anonymous mapping of its own, freed with the tensor.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or nbytes < ALIGN or not tensor.is_contiguous():
        return tensor  # under a block (AdamW's step counts, norms of small models) it is staged anyway
    if tensor.untyped_storage().data_ptr() % mmap.PAGESIZE == 0 and tensor.storage_offset() == 0:
        return tensor
    array = np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)  # the array keeps the mapping alive
    aligned = torch.from_numpy(array).view(tensor.dtype).view(tensor.shape)
    aligned.copy_(tensor)
    return aligned
