"""Loading models and tokenizers by local path, their content hashes, and the shared-vocabulary check."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import blake3
import torch
import transformers.modeling_utils as hf_modeling
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from gopd_core.hardware import compute_dtype, native_bf16, precision_setting
from storage.direct_io import safetensors_chunks, write_safetensors
from storage.layout import PENDING_WEIGHTS_FILE, write_json_atomic
from storage.parquet import fsync_dir

# Our own stages show one progress bar each; per-file "Loading weights" bars would drown them.
hf_logging.disable_progress_bar()
log = logging.getLogger(__name__)


class ModelPathError(FileNotFoundError):
    """A configured model path does not exist or is not a Hugging Face model directory."""


class VocabularyMismatchError(ValueError):
    """Two models meant to score the same token ids do not share a vocabulary."""


def check_model_dir(path: str | Path, what: str = "model", weights: bool = True) -> Path:
    """Return `path` if it is a loadable HF directory, else raise naming what is missing (`weights` False: all
    but the weights, e.g. for its tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelPathError(f"{what} path {path} does not exist (or is not a directory)")
    if not (path / "config.json").exists():
        raise ModelPathError(f"{what} path {path} has no config.json: not a Hugging Face model directory")
    if not weights:
        return path
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelPathError(f"{what} path {path} has no weights (*.safetensors): checkpoint missing its weights")
    # registry first: a deferred write removes the file before it leaves the registry
    if str(path.resolve()) not in _PENDING_WRITES and (path / PENDING_WEIGHTS_FILE).exists():
        if not weights_kept(path):
            raise ModelPathError(f"{what} path {path} was not kept on disk: the run's `checkpoint_every` kept its "
                                 "weights in memory only, until the next update changed them (every checkpoint_every-"
                                 "th iteration's checkpoint, the last one and every evaluated one are kept)")
        raise ModelPathError(f"{what} path {path}: its weights were never written ({PENDING_WEIGHTS_FILE} is "
                             "there): the run that saved it is still writing them in the background, or was "
                             "stopped before it could; resume that run to write them again")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of the model directory `path` (pad = eos where it has no pad token).

    Inside a run, one object per tokenizer content, shared by its stages (`ResidentModels.tokenizer`):
    callers must not change it.
    """
    return resident_models().tokenizer(path)


def _read_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    ResidentModels.tokenizer_loads += 1
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


NOT_TOKENIZER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
NOT_TOKENIZER_FILES = ("trainer_state.json", "generation_config.json")  # a checkpoint's, changing with its training


HASHED_FILE_BYTES = 256 << 20  # a larger file (no tokenizer's) enters the key by name, size and mtime, not content


def _tokenizer_stamp(directory: Path) -> tuple:
    """(name, size, mtime) of every file of `directory` a tokenizer may be read from: all but the weights, their
    indexes, the training state and anything hidden, e.g. a `.git` (config.json stays: AutoTokenizer may read it)."""
    files = sorted(f for f in directory.rglob("*") if f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(directory).parts)
                   and not f.name.endswith(NOT_TOKENIZER_SUFFIXES) and not f.name.endswith(".index.json")
                   and f.name not in NOT_TOKENIZER_FILES)
    return tuple((str(f.relative_to(directory)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@lru_cache(maxsize=256)
def _tokenizer_content(directory: str, stamp: tuple) -> str:
    """sha256 over the (name, bytes) of `stamp`'s files: equal for a checkpoint and the parent it copies."""
    digest = hashlib.sha256()
    for name, size, mtime in stamp:
        content = (Path(directory) / name).read_bytes() if size <= HASHED_FILE_BYTES else f"{size}@{mtime}".encode()
        digest.update(name.encode() + b"\0" + content)
    return digest.hexdigest()


def best_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype models are loaded in to score: bf16 where `device` runs it natively, else fp32.

    `GOPD_PRECISION` (float32, bfloat16) overrides; a CUDA GPU without bf16 gets fp16.
    """
    device = torch.device(device)
    if device.type == "cuda" and precision_setting() == "auto" and not native_bf16(device):
        return torch.float16
    return compute_dtype(device)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> torch.nn.Module:
    """Load a causal LM from a local directory, in eval mode."""
    path = check_model_dir(path)
    weights_written(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or best_dtype(device))
    return model.to(device).eval()


class ResidentModels:
    """An LRU of loaded models for one run, so its stages stop reloading the same weights.

    A G-OPD iteration touches the same models over and over: the teachers and the reference every
    iteration, the student checkpoint in rollout, scoring, the update and evaluation. An entry is
    keyed by the weights' files (path, sizes, mtimes), dtype and device, so a checkpoint rewritten
    on disk is a miss, never a stale hit.

    - `get`: a shared model for inference (eval mode); callers must not change its weights.
    - `take`: the model removed from the cache, for the update to train in place.
    - `put`: register an in-memory model whose weights equal those saved at `path` (the update's
      new checkpoint), with `extras` such as its optimizer, which `take` hands back.
    - `defer`: run a write that the run itself does not read back (the update's optimizer state)
      on a background thread, overlapping the next stages; `wait` joins them and re-raises their
      first error. With capacity 0 (nothing kept, the next update reads from disk) it runs now.
    - `keep_open`: an engine (anything with `close`) the run keeps up across stages, e.g. the vLLM
      sampler; closed when the run's scope closes. Not counted in `capacity`.
    - `tokenizer`: the tokenizer of a model directory, read once per content (`TOKENIZERS` kept). Every
      checkpoint directory is new, but its tokenizer files are the same bytes: a 150k-token BPE
      tokenizer takes ~1.2 s to read on this 2-core CPU, and a 2-iteration run's stages asked for
      one 23 times (`benchmarks/results/tokenizer_reads.md`).
    `capacity` models at most (least recently used leave first); 0 keeps nothing. Each run has its
    own (`keep_models_loaded`, entered by the flows); `resident_models()` is the current
    context's, or outside any run one that keeps nothing.
    """

    total_loads = 0  # models read from disk by every cache of the process, for tests and benchmarks
    tokenizer_loads = 0  # tokenizers read from disk in the process, for tests and benchmarks
    TOKENIZERS = 8

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, tuple[torch.nn.Module, dict]] = OrderedDict()
        self._tokenizers: OrderedDict[str, PreTrainedTokenizerBase] = OrderedDict()
        self._lock = threading.Lock()
        self._deferred: list[tuple[threading.Thread, list[BaseException]]] = []
        self._open: dict[tuple, object] = {}
        self.loads = 0  # models read from disk (a miss)

    @staticmethod
    def _key(path: str | Path, dtype: torch.dtype | None, device: str) -> tuple:
        return (_weights_stamp(check_model_dir(path).resolve()), dtype or best_dtype(device), str(torch.device(device)))

    def get(self, path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> torch.nn.Module:
        key = self._key(path, dtype, device)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0].eval()
        model = self._load(path, dtype, device)
        self._store(key, model, {})
        return model

    def take(self, path: str | Path, dtype: torch.dtype | None = None,
             device: str = "cpu") -> tuple[torch.nn.Module, dict]:
        key = self._key(path, dtype, device)
        with self._lock:
            if key in self._entries:
                return self._entries.pop(key)
        return self._load(path, dtype, device), {}

    def put(self, path: str | Path, model: torch.nn.Module, **extras) -> None:
        dtype = next(model.parameters()).dtype
        self._store(self._key(path, dtype, str(next(model.parameters()).device)), model.eval(), extras)

    def keep_open(self, key: tuple, opener: Callable[[], object]) -> object:
        """The engine kept under `key`, opened by `opener()` on first use (this run's scope closes it)."""
        with self._lock:
            engine = self._open.get(key)
        if engine is None:
            engine = opener()
            with self._lock:
                self._open[key] = engine
        return engine

    def tokenizer(self, path: str | Path) -> PreTrainedTokenizerBase:
        """The tokenizer of model directory `path`; with capacity, one object per content (files otherwise read)."""
        path = check_model_dir(path, "tokenizer", weights=False)  # a checkpoint kept in memory only has its files
        if self.capacity <= 0:
            return _read_tokenizer(path)
        directory = path.resolve()
        key = _tokenizer_content(str(directory), _tokenizer_stamp(directory))
        with self._lock:
            tokenizer = self._tokenizers.get(key)
            if tokenizer is not None:
                self._tokenizers.move_to_end(key)
        if tokenizer is None:
            tokenizer = _read_tokenizer(path)
            with self._lock:
                self._tokenizers[key] = tokenizer
                while len(self._tokenizers) > self.TOKENIZERS:
                    self._tokenizers.popitem(last=False)
        return tokenizer

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._tokenizers.clear()
            engines, self._open = list(self._open.values()), {}
        for engine in engines:
            engine.close()

    def defer(self, work: Callable[[], None], name: str) -> None:
        """Run `work` on a background thread (joined by `wait`); run it now if this cache keeps nothing.

        The thread runs at the normal priority. The checkpoint writes it takes go to the device from the
        tensors' own memory (`storage.direct_io`): ~40 ms of CPU for 310 MB at 25.8M parameters, the rest
        waiting on the disk. Under SCHED_IDLE (before) it got CPU only when the stages' threads all
        waited, so the next update found it unfinished and waited ~0.08 s a step for it; at nice 10 or 19
        the step was no faster than at the normal priority (64-token field step, vocabulary 259).
        """
        if self.capacity <= 0:
            work()
            return
        errors: list[BaseException] = []

        def run() -> None:  # at the normal priority: the work is mostly waiting on the device (see above)
            try:
                work()
            except BaseException as error:  # handed to whoever waits
                errors.append(error)

        thread = threading.Thread(target=run, name=f"gopd-{name}", daemon=False)
        thread.start()
        with self._lock:
            self._deferred.append((thread, errors))

    def wait(self) -> None:
        """Join every deferred write; re-raise the first error one of them hit."""
        with self._lock:
            deferred, self._deferred = self._deferred, []
        failures = []
        for thread, errors in deferred:
            thread.join()
            failures.extend(errors)
        if failures:
            raise failures[0]

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self, path: str | Path, dtype: torch.dtype | None, device: str) -> torch.nn.Module:
        self.loads += 1
        ResidentModels.total_loads += 1
        return load_model(path, dtype=dtype, device=device)

    def _store(self, key: tuple, model: torch.nn.Module, extras: dict) -> None:
        with self._lock:
            if self.capacity <= 0:
                return
            self._entries[key] = (model, extras)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


_CURRENT: ContextVar[ResidentModels | None] = ContextVar("gopd_resident_models", default=None)
_OUTSIDE_RUNS = ResidentModels(capacity=0)  # keeps nothing: every get loads


def resident_models() -> ResidentModels:
    """The model cache of the run in progress in this context; outside a run, one that keeps nothing."""
    current = _CURRENT.get()  # not `or`: an empty cache has len 0
    return _OUTSIDE_RUNS if current is None else current


@contextmanager
def keep_models_loaded(capacity: int) -> Iterator[ResidentModels]:
    """Inside (one run), the stages share up to `capacity` loaded models; all are released on exit.

    The update hands its trained model (and optimizer) to the next iteration's rollout, scoring and
    update, and the teachers and reference load once per run instead of once per iteration. The
    cache sits in a context variable, so runs in other threads or tasks of the process keep their
    own and never train a model another run is sampling from.
    """
    cache = ResidentModels(capacity)
    token = _CURRENT.set(cache)
    try:
        yield cache
    except BaseException:
        try:
            cache.wait()  # the run's error wins over a write's
        except Exception:
            log.exception("a deferred checkpoint write failed while the run was failing")
        raise
    else:
        cache.wait()  # the run's deferred checkpoint writes are on disk before it counts as finished
    finally:
        _CURRENT.reset(token)
        for held in [w for w in list(_PENDING_WRITES.values()) if isinstance(w, HeldWeights) and w.owner is cache]:
            held.release()  # their weights go with the run's models: not to be had from memory any more
        cache.clear()


def _weights_stamp(path: Path) -> tuple:
    """(file, size, mtime) of the config and weights: changes whenever the checkpoint is rewritten."""
    files = sorted([*path.glob("*.safetensors"), *path.glob("*.bin"), path / "config.json"])
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def model_hash(path: str | Path) -> str:
    """Content hash (BLAKE3, 16 hex) of a model's weights and config: same bytes, same hash.

    A checkpoint kept in memory only (`hold_weights`) keeps its identity once its weights are gone: the hash
    they were saved with, from its `PENDING_WEIGHTS_FILE`.
    """
    if str(Path(path).resolve()) not in _PENDING_WRITES and not weights_kept(path):
        return pending_weights_hash(path)
    stamp = _weights_stamp(check_model_dir(path))
    known = _SAVED_HASHES.get(stamp)
    return known if known is not None else _hash_files(stamp)


@lru_cache(maxsize=64)
def _hash_files(stamp: tuple) -> str:
    weights_written(Path(stamp[0][0]).parent)
    return _content_hash((Path(name).name, _file_blocks(name)) for name, _, _ in stamp)


def _file_blocks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        yield from iter(lambda: handle.read(1 << 22), b"")


def _content_hash(files) -> str:
    """The model hash of (file name, its bytes in chunks) pairs, in order: BLAKE3 over each name and its bytes.

    BLAKE3 hashes a large input on every core (a tree of chunks): ~13 ms per 100 MB on this 2-core CPU, where
    sha256, the hash before 2026-11-27, took ~60 ms on one core (hashes taken by earlier versions differ).
    """
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for name, chunks in files:
        digest.update(name.encode())
        for chunk in chunks:
            digest.update(chunk)
    return digest.hexdigest()[:16]


_SAVED_HASHES: dict[tuple, str] = {}  # stamp -> hash of a checkpoint `save_model` wrote, taken from memory
_SAVE_LOCK = threading.Lock()  # `save_model` swaps a transformers function for the length of one save
# checkpoint directory -> an Event set once its deferred weights are on disk, or its `HeldWeights`
_PENDING_WRITES: dict[str, threading.Event | HeldWeights] = {}


@dataclass
class SavedModel:
    """What `save_model` saved: the weights' shards (file name, tensors, metadata, file size) and their hash.

    `files`: one per safetensors shard, as transformers named them; `config`: config.json's bytes. The
    tensors are the model's own: their bytes are right until its weights next change (the update's next
    optimizer step, which waits for the deferred checkpoint work). `complete`: config.json and these
    shards are exactly the files `model_hash` reads, so `content_hash` is what it would find.
    `placeholders_mtime_ns`: set when the shards are placeholders still to be written (`defer_weights`).
    """

    config: bytes
    files: list[tuple[str, dict, dict | None, int]]
    complete: bool
    content_hash: str
    placeholders_mtime_ns: int | None = None

    def write_weights(self, directory: Path, mtime_ns: int | None = None) -> None:
        """Write the shards into `directory` (each renamed over its placeholder, whose mtime it keeps)."""
        for name, tensors, metadata, _ in self.files:
            staging = directory / f".{name}.writing"
            write_safetensors(tensors, staging, metadata)
            if mtime_ns is not None:
                os.utime(staging, ns=(mtime_ns, mtime_ns))
            os.replace(staging, directory / name)
        fsync_dir(directory)

    def write_over_placeholders(self, directory: Path) -> None:
        """The deferred write (`defer_weights_write`, `HeldWeights`): the shards over their placeholders (keeping
        their mtime), then the pending file gone."""
        self.write_weights(directory, self.placeholders_mtime_ns)
        (directory / PENDING_WEIGHTS_FILE).unlink()  # before the registry lets go (see check_model_dir)
        fsync_dir(directory)


def save_model(model: torch.nn.Module, directory: Path, *, defer_weights: bool = False,
               held: bool = False) -> SavedModel:
    """`save_pretrained` into `directory`, its safetensors written around the page cache, hashed from memory.

    transformers decides what is saved (tied weights dropped, shards, config); `storage.direct_io` writes the
    bytes (from the tensors' own memory where `training` page-aligned them). The weights' hash (`model_hash`)
    is taken from memory before anything is written (~13 ms per 100 MB), so it does not wait for the device.

    defer_weights: `directory` gets each shard as a placeholder of its final size instead, plus
    `PENDING_WEIGHTS_FILE`; `defer_weights_write` registers the final directory and hands back the write.
    held: with `defer_weights`, the weights are to stay in memory (`hold_weights`): the pending file says
    they are not kept, so that a load after the run has moved on names the reason.
    """
    files: list[tuple[str, dict, dict | None, int]] = []

    def catch_shard(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        size = sum(memoryview(chunk).nbytes for chunk in safetensors_chunks(tensors, metadata))
        files.append((Path(filename).name, tensors, metadata, size))

    with _SAVE_LOCK:
        original, hf_modeling.safe_save_file = hf_modeling.safe_save_file, catch_shard
        try:
            model.save_pretrained(str(directory), safe_serialization=True)
        finally:
            hf_modeling.safe_save_file = original
    if not files:
        raise RuntimeError("transformers saved the model without `modeling_utils.safe_save_file`: "
                           "gopd's checkpoint writer no longer matches this transformers version")
    config = (directory / "config.json").read_bytes()
    # complete: transformers wrote no weights of its own (e.g. a .bin), so config.json and the shards caught
    # here are what `model_hash` will read, in its order (by name)
    complete = not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin"))
    contents = {"config.json": [config], **{name: safetensors_chunks(tensors, metadata)
                                            for name, tensors, metadata, _ in files}}
    saved = SavedModel(config, files, complete, _content_hash((name, contents[name]) for name in sorted(contents)))
    if not (defer_weights and complete):
        saved.write_weights(directory)
        return saved
    saved.placeholders_mtime_ns = time.time_ns()  # the renames that follow keep it: the directory's stamp stays
    for name, _, _, size in files:
        with open(directory / name, "wb") as placeholder:
            placeholder.truncate(size)  # sparse: no bytes written, the final size already
        os.utime(directory / name, ns=(saved.placeholders_mtime_ns, saved.placeholders_mtime_ns))
    write_json_atomic(directory / PENDING_WEIGHTS_FILE, {"hash": saved.content_hash, **({"kept": False} if held else {})})
    return saved


def defer_weights_write(path: Path, saved: SavedModel) -> Callable[[], None]:
    """Register checkpoint `path` (saved with `defer_weights`, renamed into place) as written later.

    Its hash is known now (`model_hash` does not read the placeholders); `weights_written(path)` (model
    loads, vLLM reloads, file hashes) waits until the returned function has written the weights over the
    placeholders, keeping their mtimes, so the directory's stamp and everything keyed on it stay valid.
    """
    path = Path(path)
    remember_model_hash(path, saved)
    if saved.placeholders_mtime_ns is None:  # written at once (`save_model` could not defer)
        return lambda: None
    key = str(path.resolve())
    done = _PENDING_WRITES[key] = threading.Event()

    def write() -> None:
        try:
            saved.write_over_placeholders(path)
        finally:  # readers wake either way; after a failure check_model_dir names the unwritten weights
            _PENDING_WRITES.pop(key, None)
            done.set()

    return write


class HeldWeights:
    """A checkpoint's weights kept in the run's memory, not on disk (`hold_weights`): written only if something
    asks for its files (`weights_written`: a vLLM reload, a load from disk) before the next update changes them."""

    def __init__(self, path: Path, saved: SavedModel) -> None:
        self.path, self.saved, self.key = path, saved, str(path.resolve())
        self.owner = resident_models()  # the run whose model holds them (released when it ends)
        self.lock = threading.Lock()

    def write(self) -> None:
        """Write the weights over their placeholders now (once; a no-op after `release_held_weights`)."""
        with self.lock:
            if _PENDING_WRITES.get(self.key) is not self:
                return
            self.saved.write_over_placeholders(self.path)
            del _PENDING_WRITES[self.key]

    def release(self) -> None:
        with self.lock:
            if _PENDING_WRITES.get(self.key) is self:
                del _PENDING_WRITES[self.key]


def hold_weights(path: Path, saved: SavedModel) -> None:
    """Register checkpoint `path` (saved with `defer_weights` and `held`, renamed into place) as kept in memory.

    Its hash is known now; until `release_held_weights(path)` (the next update, before it changes the weights)
    `weights_written(path)` writes the weights from the model's own tensors on demand. Afterwards the
    directory keeps its placeholders and `check_model_dir` says the checkpoint was not kept.
    """
    path = Path(path)
    remember_model_hash(path, saved)
    if saved.placeholders_mtime_ns is not None:  # else `save_model` wrote them at once
        _PENDING_WRITES[str(path.resolve())] = HeldWeights(path, saved)


def release_held_weights(path: str | Path) -> None:
    """The model saved as held checkpoint `path` is about to change: its weights are no longer to be had."""
    held = _PENDING_WRITES.get(str(Path(path).resolve()))
    if isinstance(held, HeldWeights):
        held.release()


def weights_kept(path: str | Path) -> bool:
    """False for a checkpoint saved as held (`hold_weights`) whose weights were never written."""
    try:
        return json.loads((Path(path) / PENDING_WEIGHTS_FILE).read_text()).get("kept", True)
    except FileNotFoundError:
        return True


def remember_model_hash(path: Path, saved: SavedModel) -> None:
    """`model_hash(path)` from `saved` instead of reading the files back (for the stamp they have now)."""
    if saved.complete:
        _SAVED_HASHES[_weights_stamp(Path(path))] = saved.content_hash


def weights_written(path: str | Path) -> None:
    """Wait until a deferred write of checkpoint `path`'s weights (`defer_weights_write`) is on disk; write a
    held checkpoint's (`hold_weights`) now."""
    pending = _PENDING_WRITES.get(str(Path(path).resolve()))
    if isinstance(pending, HeldWeights):
        pending.write()
    elif pending is not None:
        pending.wait()


def pending_weights_hash(path: str | Path) -> str | None:
    """The hash a checkpoint's weights were saved with while their deferred write has not landed, else None."""
    try:
        return json.loads((Path(path) / PENDING_WEIGHTS_FILE).read_text())["hash"]
    except FileNotFoundError:
        return None


def check_same_vocab(reference: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, other_name: str) -> None:
    """Refuse a scorer whose token ids mean something else than the student's."""
    if reference.get_vocab() != other.get_vocab():
        ref_vocab, other_vocab = reference.get_vocab(), other.get_vocab()
        differing = sorted(set(ref_vocab.items()) ^ set(other_vocab.items()))[:3]
        raise VocabularyMismatchError(
            f"{other_name} has a different tokenizer vocabulary than the student "
            f"({len(other_vocab)} vs {len(ref_vocab)} tokens; e.g. {differing}); "
            "G-OPD scores the student's token ids, so teacher and student must share a tokenizer"
        )


@contextmanager
def prepacked_linears(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, every fp32 `nn.Linear` of a CPU model runs oneDNN on a weight reordered once for it.

    For token-by-token decoding only (the packed op has no backward). A decode step multiplies a
    few rows by every weight: on this project's 2-core CPU, a forward pass of the 99M perf-zoo
    model over 8 rows x 1 token took 0.051-0.056 s packed vs 0.077-0.083 s stock, and sampling 256
    tokens for 8 prompts with the 25M student 5.3 s vs 8.3 s. Packing costs about 0.3 s per 100M
    parameters, paid once per block, and for long inputs (scoring: 8 rows x 98 tokens) the packed
    forward was slower (1.68 vs 1.55 s), so scoring does not use it. Elsewhere (GPU, no oneDNN,
    other dtypes) the model runs as it is; nothing outlives the block.
    """
    patched = []
    for module in model.modules():
        if type(module) is torch.nn.Linear and onednn_packable(module.weight):
            bias = module.bias.detach() if module.bias is not None else None
            module.forward = functools.partial(packed_linear, pack_linear_weight(module.weight), bias)  # shadows the class's
            patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward


def onednn_packable(weight: torch.Tensor) -> bool:
    """Whether a linear weight can run on oneDNN's prepacked kernel: float32 on a CPU with oneDNN enabled."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and weight.device.type == "cpu" and weight.dtype == torch.float32)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) weight reordered once for `packed_linear` (costs about 0.3 s per 100M parameters)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def packed_linear(packed_weight: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    """inputs @ weight.T + bias on a weight from `pack_linear_weight` (no backward)."""
    return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), packed_weight, bias, "none", [], "")


def has_dropout(path: str | Path) -> bool:
    """True if the model's config.json sets any dropout probability above 0."""
    config = json.loads((check_model_dir(path) / "config.json").read_text())
    return any(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
               for key, value in config.items() if "dropout" in key)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of chat `messages` rendered with the model's own chat template, ready for the answer."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def read_card(path: str | Path) -> dict:
    """The zoo's JSON card beside a model (empty if the model is not from the zoo)."""
    card = Path(path) / "gopd_card.json"
    return json.loads(card.read_text()) if card.exists() else {}
