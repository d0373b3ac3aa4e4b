"""Checkpoint bytes written around the page cache (`storage.direct_io`, `gopd_core.models.save_model`)."""

from __future__ import annotations

import errno
import os
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import storage.direct_io as direct_io
from gopd_core.models import (
    PENDING_WEIGHTS_FILE,
    ModelPathError,
    _hash_files,
    _weights_stamp,
    defer_weights_write,
    load_model,
    model_hash,
    pending_weights_hash,
    save_model,
)
from storage.direct_io import (
    ALIGN,
    STAGING_BYTES,
    DirectFile,
    page_aligned,
    safetensors_chunks,
    write_safetensors,
    write_torch,
)
from tests.tiny import build_random_model


def takes_o_direct(directory) -> bool:
    """Whether this filesystem accepts O_DIRECT (tmpfs before Linux 6.6 and other systems do not)."""
    if not direct_io.O_DIRECT:
        return False
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | direct_io.O_DIRECT))
        return True
    except OSError as err:
        assert err.errno == errno.EINVAL
        return False


@pytest.mark.parametrize("pieces", [[], [1], [ALIGN - 1, 1], [ALIGN], [3, STAGING_BYTES, 5000], [2 * STAGING_BYTES + 13]])
def test_direct_file_writes_the_bytes(tmp_path, pieces):
    chunks = [os.urandom(size) for size in pieces]
    with DirectFile(tmp_path / "out.bin") as sink:
        for chunk in chunks:
            assert sink.write(chunk) == len(chunk)
    expected = b"".join(chunks)
    assert (tmp_path / "out.bin").read_bytes() == expected
    # whole blocks bypass the page cache where the filesystem allows it; the unaligned tail never does
    bypassed = len(expected) - len(expected) % ALIGN if takes_o_direct(tmp_path) else 0
    assert sink.direct_bytes == bypassed


def test_direct_file_hands_back_an_error_of_its_writer_thread(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = os.write

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the second block, written while the third is being filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", failing_write)
    sink = DirectFile(tmp_path / "out.bin")
    with pytest.raises(OSError, match="No space left"):
        with sink:
            for _ in range(4):
                sink.write(os.urandom(STAGING_BYTES))
    assert sink._fd == -1 and sink._pending is None  # closed, nothing left in flight


def test_direct_file_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "O_DIRECT", 0)  # as on a system without the flag
    payload = os.urandom(STAGING_BYTES + 777)
    with DirectFile(tmp_path / "out.bin") as sink:
        sink.write(payload)
    assert (tmp_path / "out.bin").read_bytes() == payload and sink.direct_bytes == 0


def test_torch_save_through_a_direct_file_loads_back(tmp_path):
    state = {"exp_avg": torch.randn(300, 500), "step": torch.tensor(3.0), "nested": {"ids": torch.arange(9)}}
    with DirectFile(tmp_path / "optimizer.pt") as sink:
        torch.save(state, sink)
    back = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert torch.equal(back["exp_avg"], state["exp_avg"]) and torch.equal(back["nested"]["ids"], state["nested"]["ids"])


def test_write_torch_loads_back_without_the_unchecked_crc(tmp_path):
    state = {"state": {0: {"exp_avg": torch.randn(3000), "step": torch.tensor(2.0)}}, "lr": 1e-4}
    crc32 = torch.serialization.get_crc32_options()
    assert write_torch(state, tmp_path / "optimizer.pt") > 0
    loaded = torch.load(tmp_path / "optimizer.pt")
    assert torch.equal(loaded["state"][0]["exp_avg"], state["state"][0]["exp_avg"]) and loaded["lr"] == 1e-4
    assert torch.serialization.get_crc32_options() == crc32  # the process-wide setting is restored
    with zipfile.ZipFile(tmp_path / "optimizer.pt") as archive:  # torch.save writes a zip; its CRCs were skipped
        data = [record for record in archive.infolist() if record.filename.split("/")[-2:-1] == ["data"]]
        assert data and all(record.CRC == 0 for record in data)


def test_write_safetensors_is_read_by_safetensors(tmp_path):
    tensors = {
        "w": torch.randn(33, 7), "ids": torch.arange(5, dtype=torch.int64), "half": torch.randn(4, 3).bfloat16(),
        "empty": torch.empty(0, 4), "scalar": torch.tensor(2.5), "mask": torch.tensor([True, False]),
        "strided": torch.randn(6, 8).t(),  # not contiguous
    }
    write_safetensors(tensors, tmp_path / "m.safetensors", {"format": "pt"})
    back = load_file(tmp_path / "m.safetensors")
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(tmp_path / "m.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % ALIGN == 0  # tensor data starts block-aligned
    assert b"".join(bytes(chunk) for chunk in safetensors_chunks(tensors, {"format": "pt"})) == raw  # hashable again


def test_save_model_matches_save_pretrained_and_remembers_its_hash(tmp_path):
    source = build_random_model(tmp_path / "source")  # tied embeddings: transformers leaves lm_head out
    model = AutoModelForCausalLM.from_pretrained(str(source))
    ours = tmp_path / "ours"
    saved = save_model(model, ours)
    plain = tmp_path / "plain"
    model.save_pretrained(str(plain), safe_serialization=True)

    assert saved.complete and [name for name, *_ in saved.files] == ["model.safetensors"]
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in plain.iterdir())
    ours_tensors, plain_tensors = load_file(ours / "model.safetensors"), load_file(plain / "model.safetensors")
    assert set(ours_tensors) == set(plain_tensors) and "lm_head.weight" not in ours_tensors
    assert all(torch.equal(ours_tensors[name], plain_tensors[name]) for name in plain_tensors)
    with safe_open(ours / "model.safetensors", "pt") as a, safe_open(plain / "model.safetensors", "pt") as b:
        assert a.metadata() == b.metadata()
    reloaded = AutoModelForCausalLM.from_pretrained(str(ours))
    assert all(torch.equal(x, y) for x, y in zip(reloaded.state_dict().values(), model.state_dict().values()))
    _hash_files.cache_clear()
    from_files = model_hash(ours)  # reading the files back (nothing remembered for this path)
    assert saved.content_hash == from_files  # hashed from memory before the write: the files' bytes
    moved = tmp_path / "moved"
    os.replace(ours, moved)  # as the checkpoint's staging directory is renamed into place
    assert defer_weights_write(moved, saved)() is None  # written already: nothing deferred, the hash remembered
    _hash_files.cache_clear()
    assert model_hash(moved) == from_files and _hash_files.cache_info().currsize == 0  # not read back
    (moved / "config.json").write_text((moved / "config.json").read_text() + " ")
    assert model_hash(moved) != from_files  # a rewritten file is hashed again, from disk


def test_deferred_weights_keep_the_directory_stamp_and_loads_wait_for_them(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(build_random_model(tmp_path / "source")))
    staging, final = tmp_path / ".staging", tmp_path / "checkpoint"
    saved = save_model(model, staging, defer_weights=True)
    size = os.path.getsize(staging / "model.safetensors")
    assert size == saved.files[0][3] and (staging / PENDING_WEIGHTS_FILE).exists()
    assert (staging / "model.safetensors").read_bytes() == bytes(size)  # a placeholder: no bytes yet
    os.replace(staging, final)
    write = defer_weights_write(final, saved)
    stamp = _weights_stamp(final)
    _hash_files.cache_clear()
    assert model_hash(final) == saved.content_hash and _hash_files.cache_info().currsize == 0

    loaded: list = []
    loader = threading.Thread(target=lambda: loaded.append(load_model(final, dtype=torch.float32)))
    loader.start()
    time.sleep(0.5)
    assert loader.is_alive() and not loaded  # a load from disk waits for the deferred write
    write()
    loader.join(timeout=60)
    assert all(torch.equal(x, y) for x, y in zip(loaded[0].state_dict().values(), model.state_dict().values()))
    assert _weights_stamp(final) == stamp and not (final / PENDING_WEIGHTS_FILE).exists()  # same stamp, written
    _hash_files.cache_clear()
    assert _hash_files(stamp) == saved.content_hash  # the files hold exactly the bytes hashed from memory


def test_a_checkpoint_whose_deferred_weights_never_landed_says_so(tmp_path):
    import gopd_core.models as models

    model = AutoModelForCausalLM.from_pretrained(str(build_random_model(tmp_path / "source")))
    final = tmp_path / "checkpoint"
    saved = save_model(model, final, defer_weights=True)
    defer_weights_write(final, saved)
    models._PENDING_WRITES.clear()  # as after a kill: no process is writing them any more
    with pytest.raises(ModelPathError, match="never written"):
        load_model(final)
    assert pending_weights_hash(final) == saved.content_hash  # what a resumed run compares the redone update with
    assert pending_weights_hash(tmp_path / "source") is None


def test_page_aligned_tensors_are_written_from_their_own_memory(tmp_path, monkeypatch):
    files = []

    class Recorded(DirectFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            files.append(self)

    monkeypatch.setattr(direct_io, "DirectFile", Recorded)
    def unaligned(tensor: torch.Tensor) -> torch.Tensor:  # torch's 64-byte alignment is a page now and then
        nbytes = tensor.numel() * tensor.element_size()
        room = np.empty(nbytes + 2 * ALIGN, np.uint8)
        start = -room.ctypes.data % ALIGN + 64  # a page and 64 bytes: the storage itself starts off a page
        storage = torch.from_numpy(room[start:start + nbytes])
        return storage.view(tensor.dtype).view(tensor.shape).copy_(tensor)

    plain = {"a": unaligned(torch.randn(4096)), "b": unaligned(torch.randn(3, 1000).bfloat16()), "norm": unaligned(torch.randn(7))}
    assert all(tensor.data_ptr() % ALIGN for tensor in plain.values())
    aligned = {name: page_aligned(tensor) for name, tensor in plain.items()}
    assert all(aligned[n].data_ptr() % ALIGN == 0 and torch.equal(aligned[n], plain[n]) for n in ("a", "b"))
    assert page_aligned(aligned["a"]) is aligned["a"]  # aligned already: the same tensor
    assert aligned["norm"] is plain["norm"]  # under a block: it would be staged all the same
    # safetensors: "a" (4 blocks) leads, then "norm" (28 bytes) leaves every later offset unaligned; torch.save
    # starts every storage on a block: "a" and the first whole block of "b" (6000 bytes)
    for tensors, in_place in ((plain, (0, 0)), (aligned, (4 * ALIGN, 4 * ALIGN + ALIGN))):
        expected = in_place if takes_o_direct(tmp_path) else (0, 0)
        write_safetensors(tensors, tmp_path / "m.safetensors")
        back = load_file(tmp_path / "m.safetensors")
        assert all(torch.equal(back[n], plain[n]) for n in plain)
        assert files[-1].zero_copy_bytes == expected[0]
        state = {"state": {0: {"exp_avg": tensors["a"], "step": torch.tensor(1.0)}}, "half": tensors["b"]}
        write_torch(state, tmp_path / "optimizer.pt")
        loaded = torch.load(tmp_path / "optimizer.pt", weights_only=True)
        assert torch.equal(loaded["state"][0]["exp_avg"], plain["a"]) and torch.equal(loaded["half"], plain["b"])
        assert files[-1].zero_copy_bytes == expected[1]
