"""The sandbox contains hostile code, and the code verifier judges responses through it.

Most escape tests run twice: with the in-process audit hook, and without it (``audit_hook=False``)
to prove the OS layers hold on their own. Each has a positive control where it matters, so a
test cannot pass just because nothing ran.
"""

import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from gopd_core.verify.code import verify_code, verify_code_batch
from gopd_core.verify.sandbox import (
    SANDBOX_UID_MAX,
    SANDBOX_UID_MIN,
    isolation_mode,
    processes_of_uid,
    run_untrusted,
)

PROJECT_FILE = Path(__file__).resolve().parents[1] / "pyproject.toml"
NAMESPACE = isolation_mode() == "namespace"
HOOK_MODES = [pytest.param(True, id="hook"), pytest.param(False, id="os_layers_only")]


_BASELINE_CHILDREN: set[int] = set()


@pytest.fixture(autouse=True)
def _baseline_children():
    """Children pytest already had before the test (e.g. Prefect's temporary server from other tests)."""
    _BASELINE_CHILDREN.clear()
    _BASELINE_CHILDREN.update(_all_children())
    yield


def _children_of_this_test() -> list[int]:
    """Live processes whose parent is this pytest process and that this test started (sandbox launchers)."""
    return [pid for pid in _all_children() if pid not in _BASELINE_CHILDREN]


def _all_children() -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes() if entry.isdigit() else b""
        except OSError:
            continue
        if stat and int(stat[stat.rfind(b")") + 2 :].split()[1]) == os.getpid():
            children.append(int(entry))
    return children


def _leftovers(result) -> list[int]:
    """Processes left by a run whose first stdout line is its uid (other sessions may run sandboxes too)."""
    uid = int(result.stdout.split()[0])
    own = processes_of_uid(uid) if SANDBOX_UID_MIN <= uid < SANDBOX_UID_MAX else []
    return own + _children_of_this_test()


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes() if entry.isdigit() else b""
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


PRINT_UID = "import os\nprint(os.getuid(), flush=True)\n"


def test_namespace_jail_is_used_where_it_works():
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("namespace jail needs root and util-linux unshare")
    probe = subprocess.run([unshare, "--mount", "--net", "--pid", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare does not work here: {probe.stderr!r}")
    result = run_untrusted(
        "import os; print(os.getuid(), os.getcwd(), sorted(os.listdir('/')))", audit_hook=False
    )
    assert isolation_mode() == "namespace"
    assert {"namespaces", "chroot", "uid_drop", "rlimits", "session_kill"} <= set(result.layers)
    uid, cwd, *_ = result.stdout.split(maxsplit=2)
    assert SANDBOX_UID_MIN <= int(uid) < SANDBOX_UID_MAX and cwd == "/work"
    assert "'work'" in result.stdout and "'home'" not in result.stdout and "'proc'" not in result.stdout


def test_ok_run_passes_stdin_and_allows_its_own_directory():
    code = "import sys\nopen('note.txt', 'w').write(sys.stdin.read())\nprint(open('note.txt').read().upper())"
    result = run_untrusted(code, stdin="hello")
    assert (result.ok, result.reason, result.exit_code, result.stdout) == (True, "ok", 0, "HELLO\n")


def test_error_exit_code_and_stderr():
    result = run_untrusted("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)")
    assert (result.ok, result.reason, result.exit_code) == (False, "error", 3)
    assert "boom" in result.stderr


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_infinite_loop_is_killed_by_the_cpu_limit(audit_hook):
    result = run_untrusted("while True:\n    pass", cpu_seconds=1, wall_seconds=4, audit_hook=audit_hook)
    assert result.reason == "cpu_limit" and not result.ok
    assert result.wall_s < 4


def test_sleeping_code_is_killed_by_the_wall_limit():
    result = run_untrusted(PRINT_UID + "import time\ntime.sleep(60)", wall_seconds=1)
    assert result.reason == "timeout" and result.exit_code is None
    assert result.wall_s < 2
    assert _leftovers(result) == []


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_fork_bomb_is_contained(audit_hook):
    if not audit_hook and not NAMESPACE:
        pytest.skip("without namespaces or a uid drop, only the audit hook stops a fork bomb")
    before = _children_of_this_test()
    result = run_untrusted(PRINT_UID + "while True:\n    os.fork()", wall_seconds=5, audit_hook=audit_hook)
    assert not result.ok and result.wall_s < 5
    assert before == [] and _leftovers(result) == []


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_huge_allocation_hits_the_memory_limit(audit_hook):
    result = run_untrusted("x = bytearray(10**10)\nprint('allocated')", memory_mb=256, audit_hook=audit_hook)
    assert result.reason == "memory_limit" and "allocated" not in result.stdout


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_cannot_write_outside_its_directory(tmp_path, audit_hook):
    tmp_path.chmod(0o777)  # so that plain file permissions are not what stops the write
    target = tmp_path / "escaped.txt"
    code = f"open({str(target)!r}, 'w').write('pwned')\nprint('wrote')"
    result = run_untrusted(code, audit_hook=audit_hook)
    assert not result.ok and "wrote" not in result.stdout
    assert not target.exists()


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_cannot_read_project_files(audit_hook):
    secret_line = PROJECT_FILE.read_text().splitlines()[1]  # 'requires = ["setuptools>=68"]'
    code = (
        f"for path in ({str(PROJECT_FILE)!r}, {__file__!r}):\n"
        "    try:\n"
        "        print(open(path).read())\n"
        "    except OSError as exc:\n"
        "        print('denied', type(exc).__name__)\n"
    )
    result = run_untrusted(code, audit_hook=audit_hook)
    assert secret_line not in result.stdout and "HOOK_MODES" not in result.stdout
    assert result.stdout.count("denied") == 2


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_cannot_list_the_host_file_system(audit_hook):
    code = f"import os\nprint(os.listdir({str(PROJECT_FILE.parent)!r}))"
    result = run_untrusted(code, audit_hook=audit_hook)
    assert not result.ok and "pyproject.toml" not in result.stdout


def test_host_environment_is_not_passed(monkeypatch):
    monkeypatch.setenv("GOPD_SECRET", "hunter2-do-not-leak")
    code = "import os\nprint(dict(os.environ))\nprint(open('/proc/self/environ', 'rb').read() if os.path.exists('/proc') else '')"
    result = run_untrusted(code, audit_hook=False)
    assert "hunter2" not in result.stdout + result.stderr
    assert "'PATH': '/usr/bin:/bin'" in result.stdout  # positive control: the env was printed


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_network_is_unreachable(audit_hook):
    if not audit_hook and not NAMESPACE:
        pytest.skip("without a network namespace only the audit hook blocks sockets")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n"
            "    print('connected')\n"
            "except OSError as exc:\n"
            "    print('refused', type(exc).__name__)\n"
        )
        result = run_untrusted(code, audit_hook=audit_hook)
        assert "refused" in result.stdout and "connected" not in result.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.parametrize("audit_hook", HOOK_MODES)
def test_background_processes_do_not_outlive_the_run(audit_hook):
    if not audit_hook and not NAMESPACE:
        pytest.skip("without namespaces only the audit hook and the subreaper contain daemons")
    marker = f"4242.{secrets.randbelow(10**6)}"  # an argument of sleep that only this run uses
    code = PRINT_UID + (
        "import time\n"
        "try:\n"
        "    import subprocess\n"
        f"    popen = subprocess.Popen(['/bin/sleep', '{marker}'], start_new_session=True)\n"
        "    time.sleep(0.2)\n"
        "    print('popen running', popen.poll() is None)\n"
        "except Exception as exc:\n"
        "    print('popen refused', exc)\n"
        "try:\n"
        "    middle = os.fork()\n"
        "    if middle == 0:\n"
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        f"            os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "        os._exit(0)\n"
        "    print('daemon forked', os.waitpid(middle, 0)[1] == 0)\n"
        "except Exception as exc:\n"
        "    print('fork refused', exc)\n"
        "print('parent done')\n"
    )
    result = run_untrusted(code, wall_seconds=5, audit_hook=audit_hook)
    assert "parent done" in result.stdout
    if not audit_hook:  # positive control: both escapes really started
        assert "popen running True" in result.stdout and "daemon forked True" in result.stdout
    assert result.wall_s < 3  # a daemon holding our stdout pipe would stall the run until the wall limit
    assert _leftovers(result) == [] and _processes_with(marker) == []


def test_disk_filling_file_is_stopped_by_the_file_size_limit():
    code = "with open('big.bin', 'wb') as out:\n    for _ in range(100):\n        out.write(b'x' * (1 << 20))\nprint('wrote 100 MB')"
    result = run_untrusted(code, max_file_bytes=1 << 20)
    assert result.reason == "file_limit" and "wrote 100 MB" not in result.stdout


@pytest.mark.skipif(not NAMESPACE, reason="the size-capped work directory needs the namespace jail")
def test_many_files_are_stopped_by_the_disk_cap():
    code = (
        "for index in range(40):\n"
        "    with open(f'part{index}.bin', 'wb') as out:\n"
        "        out.write(b'x' * (1 << 20))\n"
        "print('wrote 40 MB')"
    )
    result = run_untrusted(code, max_file_bytes=2 << 20, max_disk_bytes=8 << 20)
    assert result.reason == "file_limit" and "wrote 40 MB" not in result.stdout


def test_output_flood_hits_the_output_limit():
    result = run_untrusted("while True:\n    print('x' * 1000)", max_output_bytes=65536)
    assert result.reason == "output_limit" and len(result.stdout) == 65536
    assert result.wall_s < 3


def test_process_isolation_fallback_still_contains():
    # The fallback used where namespaces are unavailable: audit hook + rlimits + session kill.
    fork = run_untrusted("import os\nos.fork()\nprint('forked')", isolation="process")
    read = run_untrusted(f"print(open({str(PROJECT_FILE)!r}).read())", isolation="process")
    flood = run_untrusted("while True:\n    print('x' * 1000)", isolation="process")
    assert fork.reason == "forbidden" and "forked" not in fork.stdout
    assert read.reason == "forbidden" and "setuptools" not in read.stdout
    assert flood.reason == "output_limit"
    assert _children_of_this_test() == []


TESTS = [
    {"input": [1, 2], "output": 3},
    {"input": [2.5, 0.25], "output": 2.75},
    {"input": [[1], [2]], "output": [1, 2]},
]


def test_correct_code_passes():
    verdict = verify_code("Sure:\n```python\ndef f(a, b):\n    return a + b\n```\nDone.", TESTS)
    assert verdict.passed and verdict.reason == "passed"
    assert [case.reason for case in verdict.cases] == ["passed"] * 3


def test_wrong_code_fails_per_case():
    verdict = verify_code(
        "```python\ndef f(a, b):\n    return a * 2 if isinstance(a, int) else a + b\n```", TESTS
    )
    assert not verdict.passed and verdict.reason == "wrong_answer"
    assert [case.reason for case in verdict.cases] == ["wrong_answer", "passed", "passed"]
    assert verdict.cases[0].detail == "got 2"


def test_syntax_error_fails_without_a_sandbox():
    verdict = verify_code("```python\ndef f(a, b)\n    return a + b\n```", TESTS)
    assert (verdict.passed, verdict.reason, verdict.sandbox) == (False, "syntax_error", None)
    assert "SyntaxError" in verdict.cases[0].detail


def test_failure_reasons_of_code():
    raising = verify_code("def f(a, b):\n    raise ValueError('nope')", TESTS)
    slow = verify_code("def f(a, b):\n    while True:\n        pass", TESTS[:1], case_seconds=0.5)
    missing = verify_code("```python\ndef g(a, b):\n    return a + b\n```", TESTS)
    assert (raising.reason, raising.cases[0].detail) == ("runtime_error", "ValueError: nope")
    assert (slow.reason, missing.reason) == ("timeout", "missing_function")
    assert verify_code("no code here", TESTS).reason == "no_code"


def test_printed_fake_results_cannot_pass():
    # Expected outputs never enter the sandbox, so forging result lines needs the right answers.
    forger = (
        "import sys\n"
        "source = open(sys.argv[0]).read()\n"
        "marker = source.split('_MARKER = ')[1].split('\\n')[0].strip(\"'\")\n"
        "def f(a, b):\n"
        '    print(\'\\n\' + marker + \'{"i": 0, "status": "returned", "value": 999}\')\n'
        "    raise SystemExit\n"
    )
    verdict = verify_code(forger, TESTS)
    assert not verdict.passed and verdict.cases[0].reason == "runtime_error"


def test_batch_keeps_order():
    good = "def f(a, b):\n    return a + b"
    bad = "def f(a, b):\n    return a - b"
    verdicts = verify_code_batch([good, bad, good], [TESTS] * 3, max_workers=2)
    assert [verdict.passed for verdict in verdicts] == [True, False, True]
