"""README "Scheduled runs" end to end: a loopback Prefect server, `prefect deploy --all`, a process worker.

1. Start `prefect server start --host 127.0.0.1` on a free port with its own PREFECT_HOME; wait for /api/health.
2. Create the `gopd-local` process pool and deploy every deployment of prefect.yaml from the repo root.
3. Trigger `evaluate/adhoc` on a tiny model and tiny test data; a `--run-once` worker runs it to completion.
Server and worker run in their own sessions and are stopped, with every descendant, even when a test fails.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from tiny import build_random_model, write_task_data

from storage.catalog import run_query

ROOT = Path(__file__).resolve().parents[1]
POOL = "gopd-local"
README_DEPLOYMENTS = {"distill/nightly", "rescore/rescore", "evaluate/adhoc"}
HEALTH_TIMEOUT_S = 180  # a fresh server migrates its SQLite database first; ~50 s on a busy 2-core machine
RUN_TIMEOUT_S = 300
STOP_GRACE_S = 20

pytestmark = [
    pytest.mark.slow,  # 75-120 s on 2 cores: server start, deploy, a worker that starts a flow-run process
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc for sockets and processes"),
    pytest.mark.timeout(900),
]


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    port: int
    env: dict[str, str]  # for CLI subprocesses: isolated PREFECT_HOME, this server's API


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_hosts(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port`, read from the kernel's socket tables."""
    hosts = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        lines = table.read_text().splitlines()[1:] if table.exists() else []
        for line in lines:
            local, _remote, state = line.split()[1:4]
            address_hex, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A is TCP_LISTEN
                raw = bytes.fromhex(address_hex)
                # the kernel prints each 32-bit word of the address in host byte order
                words = [raw[i:i + 4] for i in range(0, len(raw), 4)]
                packed = b"".join(w[::-1] if sys.byteorder == "little" else w for w in words)
                hosts.add(str(ipaddress.ip_address(packed)))
    return hosts


def descendants(pid: int) -> list[int]:
    children = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(child) for child in listing.read_text().split()]
        except OSError:  # the thread or process ended meanwhile
            continue
    return [p for child in children for p in (child, *descendants(child))]


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited; init reaps it


def signal_tree(group: int, pids: list[int], signum: int) -> None:
    for send, target in ((os.killpg, group), *((os.kill, pid) for pid in pids)):
        try:
            send(target, signum)
        except ProcessLookupError:
            pass


def log_tail(log_path: Path, chars: int = 4000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else "(no log)"


@contextmanager
def running(command: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """Run `command` in its own session; on exit SIGTERM then SIGKILL its group and every descendant
    (a worker may start a flow run in a session of its own) and check that none of them is left."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        tree = [process.pid, *descendants(process.pid)]
        signal_tree(process.pid, tree, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        tree += descendants(process.pid)
        signal_tree(process.pid, tree, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 10
        while any(is_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in tree if is_alive(pid)]
        assert not left, f"{' '.join(command[3:5])} left processes {left} running"


def wait_for_health(server: PrefectServer, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prefect server exited with {process.returncode}:\n{log_tail(log_path)}"
        try:
            with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(1)
    raise TimeoutError(f"prefect server not healthy after {HEALTH_TIMEOUT_S} s:\n{log_tail(log_path)}")


def prefect_cli(server: PrefectServer, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=server.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[PrefectServer]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               GOPD_PROJECT_DIR=str(ROOT))
    server = PrefectServer(api_url, port, env)
    log_path = home / "server.log"
    # no scheduler: it would queue distill/nightly runs that a worker started near 02:00 UTC could pick up
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--no-ui", "--no-scheduler"]
    with running(command, env, log_path) as process:
        wait_for_health(server, process, log_path)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield server


@pytest.fixture(scope="module")
def deployed(server) -> PrefectServer:
    prefect_cli(server, "work-pool", "create", POOL, "--type", "process")
    prefect_cli(server, "--no-prompt", "deploy", "--all")
    return server


def test_server_listens_on_loopback_only(server):
    assert listening_hosts(server.port) == {"127.0.0.1"}


def test_deploy_all_registers_prefect_yaml(deployed):
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {f"{d['entrypoint'].split(':')[1]}/{d['name']}": d for d in spec["deployments"]}
    assert set(by_name) == README_DEPLOYMENTS
    with get_client(sync_client=True) as client:
        for name, declared in by_name.items():
            deployment = client.read_deployment_by_name(name)
            assert deployment.entrypoint == declared["entrypoint"]
            assert deployment.work_pool_name == POOL
            assert deployment.parameters == declared["parameters"]
            # {{ $GOPD_PROJECT_DIR }} is resolved at deploy time, so the worker needs no such variable
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
            schedules = [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules]
            assert schedules == ([("0 2 * * *", "UTC", True)] if name == "distill/nightly" else [])


def test_adhoc_evaluation_runs_on_a_worker(deployed, tmp_path):
    student = build_random_model(tmp_path / "student", hidden=32, seed=1)
    test_data = write_task_data(tmp_path / "data", n_train=2, n_test=2)["test"]
    eval_run = tmp_path / "eval-run"
    flow_run = run_deployment("evaluate/adhoc", timeout=0, parameters={
        "checkpoints": [str(student)], "run_dir": str(eval_run), "test_data": [str(p) for p in test_data],
        "n_samples": 2, "k": 2, "eval_prompts": 2, "max_new_tokens": 8})
    log_path = tmp_path / "worker.log"
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--run-once"]
    with running(command, deployed.env, log_path) as worker, get_client(sync_client=True) as client:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            worker_exited = worker.poll() is not None  # checked before the state, so a final state can't be missed
            state = client.read_flow_run(flow_run.id).state
            if state.is_final():
                break
            assert not worker_exited, f"worker exited with the run {state.name}:\n{log_tail(log_path)}"
            assert time.monotonic() < deadline, f"run still {state.name} after {RUN_TIMEOUT_S} s:\n{log_tail(log_path)}"
            time.sleep(2)
    assert state.is_completed(), f"run ended {state.name}: {state.message}\n{log_tail(log_path)}"
    # one checkpoint x 2 domains (math, code) x (avg@2, pass@2)
    rows = run_query(eval_run, "SELECT count(*), count(DISTINCT benchmark) FROM evals").fetchall()[0]
    assert rows == (4, 2)
