"""Untrusted code: escapes that tests/test_sandbox.py does not try yet.

tests/test_sandbox.py already covers: the sandbox's own environment (test_host_environment_is_not_passed),
project files and listing the host (test_cannot_read_project_files, test_cannot_list_the_host_file_system),
writes outside its directory, background processes that outlive the run
(test_background_processes_do_not_outlive_the_run), disk filling by one file and by many files
(test_disk_filling_file_is_stopped_by_the_file_size_limit, test_many_files_are_stopped_by_the_disk_cap),
fork bombs, memory, CPU, wall time, output floods and the network. Added here: other host processes'
environments and command lines, world-readable host files outside the project, filling /tmp and
/dev/shm, and a daemon that tries to write on the host after the run ended.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from gopd_core.verify.sandbox import isolation_mode, run_untrusted

NAMESPACE = isolation_mode() == "namespace"
HOOK_MODES = [pytest.param(True, id="hook"), pytest.param(False, id="os_layers_only")]
SECRET = "gopd-host-secret-5c1e"


def _skip_without_os_layers(audit_hook: bool) -> None:
    if not audit_hook and not NAMESPACE:
        pytest.skip("without namespaces only the audit hook guards host files")


@pytest.fixture
def host_process():
    """A host process whose environment and command line hold a secret."""
    process = subprocess.Popen(["sleep", "60", SECRET], env={**os.environ, "GOPD_HOST_TOKEN": SECRET})
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_cannot_read_other_processes_environment(host_process, audit_hook):
    _skip_without_os_layers(audit_hook)
    targets = [f"/proc/{host_process.pid}/environ", f"/proc/{host_process.pid}/cmdline", f"/proc/{os.getpid()}/environ",
               "/proc/1/environ"]
    code = (
        "import os\n"
        f"for path in {targets!r} + ['/proc/%d/environ' % os.getppid()]:\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read())\n"
        "    except Exception as exc:\n"
        "        print(path, 'denied', type(exc).__name__)\n"
    )
    result = run_untrusted(code, audit_hook=audit_hook)
    assert SECRET not in result.stdout + result.stderr
    assert result.stdout.count("denied") == 5, result.stdout  # positive control: every probe ran and failed


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_cannot_read_world_readable_host_files(tmp_path, audit_hook):
    _skip_without_os_layers(audit_hook)
    readable = tmp_path / "host-note.txt"
    readable.write_text(SECRET)
    readable.chmod(0o644)
    tmp_path.chmod(0o755)
    targets = [str(readable), "/etc/passwd", "/etc/hostname", "/root/.bashrc", "/etc/shadow"]
    code = (
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        print(path, open(path).read()[:40])\n"
        "    except Exception as exc:\n"
        "        print(path, 'denied', type(exc).__name__)\n"
    )
    result = run_untrusted(code, audit_hook=audit_hook)
    assert SECRET not in result.stdout and "root:" not in result.stdout
    assert result.stdout.count("denied") == len(targets), result.stdout


@pytest.mark.parametrize("target", ["/tmp", "/dev/shm"])
def test_filling_tmp_or_shared_memory_is_stopped(target):
    code = (
        "import os\n"
        "written = 0\n"
        "try:\n"
        "    for index in range(64):\n"
        f"        with open(os.path.join({target!r}, f'fill{{index}}.bin'), 'wb') as out:\n"
        "            out.write(b'x' * (1 << 20))\n"
        "        written += 1\n"
        "finally:\n"
        "    print('wrote MB', written, flush=True)\n"
    )
    result = run_untrusted(code, max_file_bytes=2 << 20, max_disk_bytes=8 << 20, audit_hook=False) if NAMESPACE \
        else run_untrusted(code, max_file_bytes=2 << 20)
    assert not result.ok and "wrote MB 64" not in result.stdout
    if NAMESPACE:
        assert "wrote MB" in result.stdout and int(result.stdout.split()[-1]) <= 8  # /tmp capped, /dev/shm absent
    assert not os.path.exists(os.path.join(target, "fill9.bin"))  # nothing reached the host's /tmp or /dev/shm


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_a_daemon_cannot_write_on_the_host_after_the_run(tmp_path, audit_hook):
    if not audit_hook and not NAMESPACE:
        pytest.skip("without namespaces only the audit hook and the subreaper contain daemons")
    tmp_path.chmod(0o777)
    target = tmp_path / "written-later.txt"
    code = (
        "import os, time\n"
        "try:\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        time.sleep(1.5)\n"
        f"        open({str(target)!r}, 'w').write('late')\n"
        "        os._exit(0)\n"
        "    print('forked')\n"
        "except Exception as exc:\n"
        "    print('refused', type(exc).__name__)\n"
    )
    result = run_untrusted(code, wall_seconds=5, audit_hook=audit_hook)
    assert "forked" in result.stdout or "refused" in result.stdout
    time.sleep(2.5)  # past the moment the daemon would have written
    assert not target.exists()
