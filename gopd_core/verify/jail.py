"""Sandbox launcher: builds the jail, starts the untrusted interpreter in it, reports how it ended.

Runs as ``python -I -S -B jail.py CONFIG_JSON``, as root when the host is root, either inside
``unshare --mount --net --pid --ipc --uts --fork --kill-child`` (mode "namespace", where it is PID 1
of the new PID namespace) or directly in a fresh session (mode "process"). Standard library only:
``-I`` keeps the gopd package off ``sys.path``.

Steps:
1. Namespace mode only: make every mount private, mount a small tmpfs as the new root, bind the
   interpreter's directories and a few devices into it read-only, bind the script directory
   read-only at /box, mount a size-capped tmpfs owned by the sandbox uid at /work, point /tmp at
   /work, and remount the new root read-only. Nothing else of the host file system is visible.
2. Fork. The child enters the jail (chroot + chdir, or chdir only in process mode), sets the
   rlimits, drops to the sandbox uid, sets no_new_privs and execs the interpreter. An exec failure
   comes back over a close-on-exec pipe, so it cannot be confused with the script's exit code.
3. Wait for the child and write its exit code and CPU time to the status file (atomic rename).
4. Process mode only: as child subreaper, kill every remaining descendant (double-forked
   daemons included). In namespace mode the kernel does this when PID 1 exits.
"""

import ctypes
import json
import os
import resource
import signal
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
ROOT_TMPFS_OPTIONS = "size=4m,mode=0755"

_LIBC = ctypes.CDLL(None, use_errno=True)


def _encode(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """Call mount(2); raise OSError naming the target on failure."""
    rc = _LIBC.mount(_encode(source), _encode(target), _encode(fstype), ctypes.c_ulong(flags), _encode(data))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source!r} on {target!r} failed: {os.strerror(err)}")


def _prctl(option: int, value: int) -> None:
    if _LIBC.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def _bind_readonly(source: str, target: str, flags: int = MS_NOSUID | MS_NODEV) -> None:
    """Bind ``source`` at ``target`` and make that bind read-only."""
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)


def _expose(root: str, path: str) -> None:
    """Make host ``path`` (a symlink, directory, file or device) appear at the same path in ``root``."""
    target = root + path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
    elif os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
        _bind_readonly(path, target)
    elif os.path.exists(path):
        with open(target, "wb"):
            pass
        _bind_readonly(path, target, MS_NOSUID)  # device nodes must keep working: no nodev


def build_root(config: dict) -> None:
    """Step 1: assemble the read-only root file system described in the module docstring."""
    root = config["root_dir"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("gopd-sandbox-root", root, "tmpfs", MS_NOSUID | MS_NODEV, ROOT_TMPFS_OPTIONS)
    for path in config["ro_paths"]:
        _expose(root, path)
    os.mkdir(root + "/box")
    _bind_readonly(config["box_dir"], root + "/box")
    os.mkdir(root + "/work")
    uid = config["uid"] if config["uid"] is not None else 0
    work_options = f"size={config['disk_bytes']},mode=0700,uid={uid},gid={uid}"
    _mount("gopd-sandbox-work", root + "/work", "tmpfs", MS_NOSUID | MS_NODEV, work_options)
    os.symlink("/work", root + "/tmp")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, ROOT_TMPFS_OPTIONS)


def _enter_and_exec(config: dict) -> None:
    """Step 2, in the forked child: enter the jail, limit, drop privileges, exec. Never returns."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if config["mode"] == "namespace":
        os.chroot(config["root_dir"])
        os.chdir("/work")
    else:
        os.chdir(config["work_dir"])
    limits = config["limits"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file"], limits["file"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    if limits["processes"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    uid = config["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.execve(config["python"], config["argv"], config["env"])


def _start_child(config: dict) -> int:
    """Fork the untrusted child; return its pid, or raise RuntimeError with its setup failure."""
    error_read, error_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(error_read)
        try:
            _enter_and_exec(config)
        except BaseException as exc:  # noqa: BLE001 - report any setup failure to the parent
            os.write(error_write, f"{type(exc).__name__}: {exc}".encode())
        os._exit(127)
    os.close(error_write)
    with os.fdopen(error_read, "rb") as error_pipe:
        message = error_pipe.read().decode(errors="replace")
    if message:
        os.waitpid(pid, 0)
        raise RuntimeError(f"entering the sandbox failed: {message}")
    return pid


def _children_of(parent_pid: int) -> list[int]:
    """Pids whose parent is ``parent_pid``, read from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == parent_pid:
            children.append(int(entry))
    return children


def kill_descendants() -> None:
    """Step 4: SIGKILL and reap every descendant; orphans come back to us as subreaper."""
    me = os.getpid()
    for _ in range(10_000):
        children = _children_of(me)
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _write_status(path: str, status: dict) -> None:
    with open(path + ".part", "w", encoding="utf-8") as status_file:
        json.dump(status, status_file)
    os.replace(path + ".part", path)


def run(config: dict) -> dict:
    """Steps 1-4; return the status dict written for the host."""
    if config["mode"] == "namespace":
        build_root(config)
    else:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    pid = _start_child(config)
    _, wait_status, usage = os.wait4(pid, 0)
    status = {
        "exit_code": os.waitstatus_to_exitcode(wait_status),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_kb": usage.ru_maxrss,
    }
    if config["mode"] != "namespace":
        kill_descendants()
    return status


def main(argv: list[str]) -> int:
    """Entry point: never prints (stdout/stderr belong to the untrusted child)."""
    with open(argv[1], encoding="utf-8") as config_file:
        config = json.load(config_file)
    try:
        status = run(config)
    except Exception as exc:  # noqa: BLE001 - the host turns this into a SandboxSetupError
        status = {"setup_error": f"{type(exc).__name__}: {exc}"}
    _write_status(config["status_path"], status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
