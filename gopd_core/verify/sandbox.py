"""Run untrusted Python code in a separate, contained process and capture what it printed.

``run_untrusted(code)`` writes the code to a fresh temporary directory and starts
``jail.py`` (the launcher), which starts ``python -I -S -B`` on it. Containment, strongest first;
``SandboxResult.layers`` names the ones that were active for a run:

- "namespaces": the launcher runs under ``unshare --mount --net --pid --ipc --uts --fork
  --kill-child``: no network (only a downed loopback), its own PID space whose every process the
  kernel kills when the launcher exits, and its own mounts. Needs root and util-linux ``unshare``.
- "chroot": with namespaces, the code sees a read-only tmpfs root holding only /usr, the
  interpreter's directories, a few devices, its script at /box and a size-capped tmpfs at /work
  (its working directory and /tmp). Project files, /root, /home and /etc do not exist for it.
- "uid_drop": the code runs as a fresh unprivileged uid (one per run), so the OS refuses writes
  to host files, signals to host processes, and RLIMIT_NPROC binds (it does not bind for root).
- "rlimits": CPU seconds, address space, file size, open files, processes; no core dumps.
- "no_new_privs": setuid binaries cannot raise privileges.
- "session_kill": the launcher leads a new session; its whole process group is SIGKILLed on
  timeout, on output overflow and at the end of every run; with "uid_drop", every process of the
  run's uid is killed too. Without namespaces the launcher is also a child subreaper that kills
  every leftover descendant ("subreaper_kill").
- "audit_hook": ``prelude.py`` refuses fork/exec/spawn, sockets, ctypes, signals, and file
  access outside the working directory (reads also allowed for the stdlib). Defense in depth only.

Without root or a working ``unshare`` the run falls back to the "process" isolation (no
namespaces, no chroot; no uid drop unless root and the interpreter is world-executable).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOGGER = logging.getLogger(__name__)
SANDBOX_UID_MIN = 1_000_000
SANDBOX_UID_MAX = 2_000_000
REASONS = frozenset(
    {
        "ok",
        "error",
        "timeout",
        "cpu_limit",
        "memory_limit",
        "output_limit",
        "file_limit",
        "forbidden",
        "killed",
    }
)
_JAIL_SCRIPT = Path(__file__).with_name("jail.py")
_PRELUDE_SCRIPT = Path(__file__).with_name("prelude.py")
_SYSTEM_PATHS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin", "/etc/ld.so.cache")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_UNSHARE_FLAGS = ("--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child")
_READ_CHUNK = 65536
_OPEN_FILES = 64


class SandboxSetupError(RuntimeError):
    """The sandbox itself could not be started (not a failure of the untrusted code)."""


@dataclass(frozen=True)
class SandboxResult:
    """How one untrusted run ended.

    ``exit_code`` follows subprocess: negative means killed by that signal; None when the run was
    killed from outside (timeout, output flood) before it reported. ``stdout``/``stderr`` hold at
    most ``max_output_bytes`` each, decoded as UTF-8 with replacement. ``reason`` is one of
    ``REASONS``; ``ok`` is ``reason == "ok"``. ``wall_s`` and ``cpu_s`` are seconds.
    """

    ok: bool
    exit_code: int | None
    stdout: str
    stderr: str
    reason: str
    wall_s: float
    cpu_s: float
    layers: tuple[str, ...]


def _ancestors_world_executable(path: str) -> bool:
    """True if every directory above ``path`` is o+x and ``path`` itself is o+rx."""
    current = Path(path)
    if os.stat(current).st_mode & 0o005 != 0o005:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in current.parents)


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def _readonly_paths() -> list[str]:
    """Host paths to expose read-only in the jail: system dirs, interpreter dirs, devices."""
    interpreter_dirs = {
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sys.prefix),
        os.path.dirname(_interpreter()),
    }
    paths: list[str] = [path for path in _SYSTEM_PATHS if os.path.lexists(path)]
    for path in sorted(interpreter_dirs):
        covered = any(path == kept or path.startswith(kept + "/") for kept in paths if os.path.isdir(kept))
        if not covered:
            paths.append(path)
    return paths + [path for path in _DEVICES if os.path.exists(path)]


@functools.cache
def _namespaces_work() -> bool:
    """Probe once: can a namespace jail start here and run a trivial script?"""
    if os.geteuid() != 0 or _unshare_binary() is None:
        return False
    try:
        probe = run_untrusted("print('ok')", isolation="namespace", audit_hook=False, wall_seconds=20)
    except (SandboxSetupError, OSError) as exc:
        LOGGER.warning("sandbox: namespace jail unavailable (%s); using process isolation", exc)
        return False
    if probe.stdout != "ok\n":
        LOGGER.warning(
            "sandbox: namespace probe failed (%s: %s); using process isolation", probe.reason, probe.stderr
        )
    return probe.stdout == "ok\n"


def _unshare_binary() -> str | None:
    return shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")


def isolation_mode() -> str:
    """The isolation "auto" resolves to on this machine: "namespace" or "process"."""
    return "namespace" if _namespaces_work() else "process"


def _layers(mode: str, uid: int | None, audit_hook: bool) -> tuple[str, ...]:
    layers = ["namespaces", "chroot"] if mode == "namespace" else ["subreaper_kill"]
    if uid is not None:
        layers.append("uid_drop")
    layers += ["rlimits", "no_new_privs", "session_kill"]
    if audit_hook:
        layers.append("audit_hook")
    return tuple(layers)


def _sandbox_uid(mode: str) -> int | None:
    """A fresh uid for this run when we can switch to it, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    if mode == "process" and not _ancestors_world_executable(_interpreter()):
        return None  # the unprivileged uid could not even start the interpreter
    return SANDBOX_UID_MIN + secrets.randbelow(SANDBOX_UID_MAX - SANDBOX_UID_MIN)


def _prepare_dir(scratch: Path, code: str, mode: str, uid: int | None) -> dict[str, str]:
    """Lay out the scratch directory; return the paths the launcher config needs."""
    scratch.chmod(0o711)
    box = scratch / "box"
    box.mkdir(mode=0o755)
    (box / "main.py").write_text(code, encoding="utf-8")
    shutil.copyfile(_PRELUDE_SCRIPT, box / "prelude.py")
    for script in box.iterdir():
        script.chmod(0o644)
    work = scratch / "work"
    work.mkdir(mode=0o700)
    if uid is not None:
        os.chown(work, uid, uid)
    (scratch / "root").mkdir(mode=0o755)
    inside = "/" if mode == "namespace" else str(scratch) + "/"
    return {"box": str(box), "work": str(work), "box_inside": inside + "box", "work_inside": inside + "work"}


def _launcher_config(
    scratch: Path, paths: dict[str, str], mode: str, uid: int | None, audit_hook: bool, limits: dict
) -> dict:
    script = f"{paths['box_inside']}/main.py"
    argv = [_interpreter(), "-I", "-S", "-B"]
    argv += [f"{paths['box_inside']}/prelude.py", script] if audit_hook else [script]
    work = paths["work_inside"]
    return {
        "mode": mode,
        "python": _interpreter(),
        "argv": argv,
        "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work},
        "uid": uid,
        "limits": limits,
        "disk_bytes": limits["disk"],
        "box_dir": paths["box"],
        "work_dir": paths["work"],
        "root_dir": str(scratch / "root"),
        "ro_paths": _readonly_paths(),
        "status_path": str(scratch / "status.json"),
    }


def _pump(
    proc: subprocess.Popen, stdin_bytes: bytes, deadline: float, max_output_bytes: int
) -> tuple[bytes, bytes, str | None]:
    """Feed stdin and collect stdout/stderr until EOF; stop early on "timeout" or "output_limit"."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    pending = memoryview(stdin_bytes)
    limit_hit = None
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            os.set_blocking(stream.fileno(), False)
            selector.register(stream, selectors.EVENT_READ)
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while selector.get_map() and limit_hit is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                limit_hit = "timeout"
                break
            for key, _ in selector.select(remaining):
                if key.fileobj is proc.stdin:
                    try:
                        written = os.write(key.fd, pending[:_READ_CHUNK])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                buffer += chunk
                if len(buffer) > max_output_bytes:
                    del buffer[max_output_bytes:]
                    limit_hit = "output_limit"
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), limit_hit


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def processes_of_uid(uid: int) -> list[int]:
    """Pids of live processes whose real uid is ``uid`` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:") and int(line.split()[1]) == uid:
                pids.append(int(entry))
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of the run's private uid, repeating while new ones appear."""
    for _ in range(100):
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def classify(limit_hit: str | None, status: dict | None, stderr: str, cpu_limit_s: int) -> str:
    """Map how the run ended to one of ``REASONS`` (limits first, then signals, then stderr)."""
    if limit_hit is not None:
        return limit_hit
    if status is None:
        return "killed"
    exit_code = status["exit_code"]
    if exit_code == 0:
        return "ok"
    if exit_code < 0:
        if -exit_code == signal.SIGXCPU or status["cpu_s"] >= cpu_limit_s:
            return "cpu_limit"
        return "file_limit" if -exit_code == signal.SIGXFSZ else "killed"
    tail = stderr[-2000:]
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "memory_limit"
    if "File too large" in tail or "No space left on device" in tail:
        return "file_limit"
    return "forbidden" if "sandbox:" in tail else "error"


def _read_status(path: Path) -> dict | None:
    """The launcher's status, None if it never wrote one; SandboxSetupError if it failed."""
    if not path.exists():
        return None
    status = json.loads(path.read_text(encoding="utf-8"))
    if "setup_error" in status:
        raise SandboxSetupError(f"sandbox launcher failed: {status['setup_error']}")
    return status


def _launcher_command(mode: str, config_path: Path) -> list[str]:
    command = [_interpreter(), "-I", "-S", "-B", str(_JAIL_SCRIPT), str(config_path)]
    return [_unshare_binary() or "unshare", *_UNSHARE_FLAGS, *command] if mode == "namespace" else command


def _launch(
    command: list[str],
    scratch: Path,
    stdin_bytes: bytes,
    deadline: float,
    max_output_bytes: int,
    uid: int | None,
) -> tuple[bytes, bytes, str | None]:
    """Start the launcher, pump its pipes until EOF or a limit, then kill everything the run left.

    Returns (stdout, stderr, limit_hit) with limit_hit "timeout", "output_limit" or None.
    """
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=scratch,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        start_new_session=True,
    )
    try:
        stdout, stderr, limit_hit = _pump(proc, stdin_bytes, deadline, max_output_bytes)
        if limit_hit is None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                limit_hit = "timeout"
    finally:
        _kill_group(proc.pid)
        if uid is not None:
            _kill_uid(uid)
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    return stdout, stderr, limit_hit


def _check_limits(cpu_seconds: float, wall_seconds: float, memory_mb: int, max_processes: int) -> None:
    if cpu_seconds <= 0 or wall_seconds <= 0:
        raise ValueError(f"cpu_seconds and wall_seconds must be > 0, got {cpu_seconds}, {wall_seconds}")
    if memory_mb < 32 or max_processes < 1:
        raise ValueError(f"need memory_mb >= 32 and max_processes >= 1, got {memory_mb}, {max_processes}")


def run_untrusted(
    code: str,
    *,
    stdin: str = "",
    cpu_seconds: float = 2,
    wall_seconds: float = 5,
    memory_mb: int = 256,
    max_output_bytes: int = 65536,
    max_file_bytes: int = 1 << 20,
    max_disk_bytes: int = 16 << 20,
    max_processes: int = 16,
    audit_hook: bool = True,
    isolation: str = "auto",
) -> SandboxResult:
    """Run ``code`` as a Python script in the sandbox described in the module docstring.

    Limits: ``cpu_seconds`` of CPU (rounded up to whole seconds), ``wall_seconds`` of wall time
    for the whole run, ``memory_mb`` of address space, ``max_output_bytes`` per stream,
    ``max_file_bytes`` per written file, ``max_disk_bytes`` for the working directory (namespace
    isolation only), ``max_processes`` processes and threads (only with a uid drop).
    ``isolation`` is "auto", "namespace" or "process"; ``audit_hook=False`` leaves out the
    in-process policy hook (to test the OS layers alone). Raises SandboxSetupError when the
    sandbox cannot start; the untrusted code's own failures are reported in the result.
    """
    _check_limits(cpu_seconds, wall_seconds, memory_mb, max_processes)
    mode = isolation_mode() if isolation == "auto" else isolation
    if mode not in ("namespace", "process"):
        raise ValueError(f"isolation must be 'auto', 'namespace' or 'process', got {isolation!r}")
    uid = _sandbox_uid(mode)
    cpu_limit_s = max(1, math.ceil(cpu_seconds))
    limits = {
        "cpu": cpu_limit_s,
        "memory": memory_mb << 20,
        "file": max_file_bytes,
        "disk": max_disk_bytes,
        "open_files": _OPEN_FILES,
        "processes": max_processes if uid is not None else None,
    }
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="gopd-sandbox-"))
    try:
        paths = _prepare_dir(scratch, code, mode, uid)
        config_path = scratch / "launcher.json"
        config_path.write_text(json.dumps(_launcher_config(scratch, paths, mode, uid, audit_hook, limits)))
        stdout, stderr, limit_hit = _launch(
            _launcher_command(mode, config_path),
            scratch,
            stdin.encode(),
            started + wall_seconds,
            max_output_bytes,
            uid,
        )
        status = _read_status(scratch / "status.json")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stderr_text = stderr.decode(errors="replace")
    reason = classify(limit_hit, status, stderr_text, cpu_limit_s)
    return SandboxResult(
        ok=reason == "ok",
        exit_code=None if status is None else status["exit_code"],
        stdout=stdout.decode(errors="replace"),
        stderr=stderr_text,
        reason=reason,
        wall_s=time.monotonic() - started,
        cpu_s=0.0 if status is None else status["cpu_s"],
        layers=_layers(mode, uid, audit_hook),
    )
