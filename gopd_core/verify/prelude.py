"""Child-side bootstrap of the sandbox: installs an audit hook, then runs the untrusted script.

Runs as ``python -I -S -B prelude.py SCRIPT`` inside the sandbox; it is copied next to the
untrusted script and must import nothing outside the standard library.

This is defense in depth, not the security boundary: a determined script can get around a
Python-level hook (for example by monkeypatching the stdlib functions the hook relies on). The
boundary is the OS layers set up by ``jail.py`` (namespaces, chroot, unprivileged uid, rlimits).

Steps:
1. Read the untrusted script and note the allowed roots: the working directory (read/write),
   the script's directory, the standard library directories and a few devices (read only).
2. Install an audit hook that refuses process creation, signals to other processes, sockets,
   ctypes, gc introspection, rlimit changes, and file access outside the allowed roots.
3. Execute the script as ``__main__`` in a fresh module.
"""

import os
import sys
import types

_DENIED_EVENTS = frozenset(
    {
        "os.system",
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.kill",
        "os.killpg",
        "os.chroot",
        "subprocess.Popen",
        "signal.pthread_kill",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "resource.setrlimit",
        "resource.prlimit",
        "sys.addaudithook",
        "pty.spawn",
    }
)
_DENIED_PREFIXES = ("socket.", "ctypes.", "_ctypes.")
# Importing these gives C-level process creation or raw memory access without an audit event.
_DENIED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters"})
# Events whose first argument is a path that must be inside the working directory.
_WRITE_PATH_EVENTS = frozenset(
    {
        "os.remove",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.truncate",
        "os.utime",
        "os.mkfifo",
        "os.mknod",
        "os.setxattr",
        "os.removexattr",
        "shutil.rmtree",
        "sqlite3.connect",
    }
)
# Events whose first two arguments are both paths that must be inside the working directory.
_WRITE_TWO_PATH_EVENTS = frozenset({"os.rename", "os.link", "os.symlink", "shutil.move"})
# Events that read their first path argument and write their second.
_COPY_EVENTS = frozenset({"shutil.copyfile", "shutil.copytree"})
_READ_PATH_EVENTS = frozenset({"os.listdir", "os.scandir", "os.chdir", "glob.glob", "os.getxattr"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_READABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


class SandboxViolation(PermissionError):
    """Raised inside the sandbox when the untrusted code does something the policy forbids."""


def _is_under(path: str, roots: tuple[str, ...]) -> bool:
    """True if the (already resolved) ``path`` equals or lies below one of ``roots``."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def make_hook(write_roots: tuple[str, ...], read_roots: tuple[str, ...]):
    """Build the audit hook for the given allowed roots (absolute, resolved paths).

    Helpers are bound as default arguments so that rebinding module globals cannot change them.
    """

    def resolve(path, _fspath=os.fspath, _realpath=os.path.realpath, _decode=os.fsdecode) -> str | None:
        if isinstance(path, int) or path is None:
            return None  # an already-open descriptor, or "current directory"
        return _realpath(_decode(_fspath(path)))

    def check(event: str, path, write: bool) -> None:
        resolved = resolve(path)
        if resolved is None:
            return
        roots = write_roots if write else write_roots + read_roots
        if not _is_under(resolved, roots):
            raise SandboxViolation(f"sandbox: {event} of {resolved!r} is outside the sandbox")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _mode, flags = args
            check(event, path, write=bool((flags or 0) & _WRITE_FLAGS))
        elif event == "import":
            if args[0] in _DENIED_MODULES:
                raise SandboxViolation(f"sandbox: import of {args[0]!r} is not allowed")
        elif event in _DENIED_EVENTS or event.startswith(_DENIED_PREFIXES):
            raise SandboxViolation(f"sandbox: {event} is not allowed")
        elif event in _WRITE_PATH_EVENTS:
            check(event, args[0], write=True)
        elif event in _WRITE_TWO_PATH_EVENTS:
            check(event, args[0], write=True)
            check(event, args[1], write=True)
        elif event in _COPY_EVENTS:
            check(event, args[0], write=False)
            check(event, args[1], write=True)
        elif event in _READ_PATH_EVENTS:
            check(event, args[0] if args else None, write=False)

    return hook


def main(argv: list[str]) -> None:
    """Install the hook and run ``argv[1]`` as ``__main__`` with ``argv[1:]`` as ``sys.argv``."""
    script_path = os.path.realpath(argv[1])
    with open(script_path, encoding="utf-8") as script_file:
        source = script_file.read()
    write_roots = (os.path.realpath(os.getcwd()),)
    stdlib_roots = tuple(os.path.realpath(entry) for entry in sys.path if entry)
    read_roots = (os.path.dirname(script_path), *stdlib_roots, *_READABLE_DEVICES)
    code = compile(source, script_path, "exec")
    sys.addaudithook(make_hook(write_roots, read_roots))
    module = types.ModuleType("__main__")
    module.__file__ = script_path
    sys.modules["__main__"] = module
    sys.argv = argv[1:]
    exec(code, module.__dict__)


if __name__ == "__main__":
    main(sys.argv)
