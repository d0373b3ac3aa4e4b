"""Checkpoint bytes written around the page cache (`storage.direct_io`, `gopd_core.models.save_model`)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import threading
import time
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import storage.direct_io as direct_io
from gopd_core.models import _hash_files, model_hash, promise_model_hash, save_model
from storage.direct_io import (
    ALIGN,
    STAGING_BYTES,
    DirectFile,
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


@pytest.mark.parametrize("pieces", [[5], [STAGING_BYTES], [3, 2 * STAGING_BYTES, 5000, STAGING_BYTES - 3]])
def test_direct_file_hashes_exactly_the_bytes_it_writes(tmp_path, pieces):
    chunks = [os.urandom(size) for size in pieces]
    digest = hashlib.sha256()
    with DirectFile(tmp_path / "out.bin", digest) as sink:
        for chunk in chunks:
            sink.write(memoryview(chunk))
    assert digest.hexdigest() == hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest()
    assert (tmp_path / "out.bin").read_bytes() == b"".join(chunks)


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


def test_save_model_matches_save_pretrained_and_promises_its_hash(tmp_path):
    source = build_random_model(tmp_path / "source")  # tied embeddings: transformers leaves lm_head out
    model = AutoModelForCausalLM.from_pretrained(str(source))
    ours = tmp_path / "ours"
    saved = save_model(model, ours)
    plain = tmp_path / "plain"
    model.save_pretrained(str(plain), safe_serialization=True)

    assert saved.complete and [name for name, _, _ in saved.files] == ["model.safetensors"]
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in plain.iterdir())
    ours_tensors, plain_tensors = load_file(ours / "model.safetensors"), load_file(plain / "model.safetensors")
    assert set(ours_tensors) == set(plain_tensors) and "lm_head.weight" not in ours_tensors
    assert all(torch.equal(ours_tensors[name], plain_tensors[name]) for name in plain_tensors)
    with safe_open(ours / "model.safetensors", "pt") as a, safe_open(plain / "model.safetensors", "pt") as b:
        assert a.metadata() == b.metadata()
    reloaded = AutoModelForCausalLM.from_pretrained(str(ours))
    assert all(torch.equal(x, y) for x, y in zip(reloaded.state_dict().values(), model.state_dict().values()))
    _hash_files.cache_clear()
    from_files = model_hash(ours)  # reading the files back (nothing promised for this path)

    assert saved.written_hash == from_files  # hashed while it was written
    moved = tmp_path / "moved"
    os.replace(ours, moved)  # as the checkpoint's staging directory is renamed into place
    keep = promise_model_hash(moved, dataclasses.replace(saved, written_hash=None))  # as if it had not been
    _hash_files.cache_clear()
    late = threading.Thread(target=lambda: (time.sleep(0.3), keep()))
    late.start()
    assert model_hash(moved) == from_files  # waited for the promise, taken from memory
    late.join()
    assert _hash_files.cache_info().currsize == 0  # the files were not read back
    (moved / "config.json").write_text((moved / "config.json").read_text() + " ")
    assert model_hash(moved) != from_files  # a rewritten file is hashed again, from disk


@pytest.mark.parametrize("config_json", ["written after the weights", "rewritten after the weights"])
def test_save_model_hashes_from_memory_when_the_written_bytes_are_not_the_files(tmp_path, monkeypatch, config_json):
    import gopd_core.models as models

    model = AutoModelForCausalLM.from_pretrained(str(build_random_model(tmp_path / "source")))
    directory = tmp_path / "saved"
    write_config = model.config.save_pretrained
    if config_json == "written after the weights":
        monkeypatch.setattr(type(model.config), "save_pretrained", lambda *args, **kwargs: None)

    def then_config(*args, **kwargs):
        written = write_safetensors(*args, **kwargs)
        write_config(directory)  # the config as transformers writes it ...
        if config_json == "rewritten after the weights":  # ... or another one than was hashed
            (directory / "config.json").write_text((directory / "config.json").read_text() + " ")
        return written

    monkeypatch.setattr(models, "write_safetensors", then_config)
    saved = save_model(model, directory)
    assert saved.complete and saved.written_hash is None  # not what the files hold: taken from memory instead
    _hash_files.cache_clear()
    assert saved.content_hash() == model_hash(directory)
