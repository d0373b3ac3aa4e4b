"""The Prefect server the project starts listens on loopback only (unless the user says otherwise)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from harness import ROOT

PRINT_HOST = "import flows\nfrom prefect.settings import get_current_settings\nprint(get_current_settings().server.api.host)"


def _host_after_importing_flows(tmp_path: Path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    clean.update({"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home"), **env})
    result = subprocess.run([sys.executable, "-c", PRINT_HOST], cwd=ROOT, env=clean, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_server_settings_resolve_to_loopback_after_importing_flows(tmp_path):
    assert ipaddress.ip_address(_host_after_importing_flows(tmp_path)).is_loopback


def test_a_host_the_user_configured_is_kept(tmp_path):
    assert _host_after_importing_flows(tmp_path, PREFECT_SERVER_API_HOST="0.0.0.0") == "0.0.0.0"


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of sockets in LISTEN state on `port`, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(address)
                # /proc stores each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(str(ipaddress.ip_address(raw)))
    return found


def test_the_ephemeral_server_listens_on_loopback_only(prefect_api_url):
    port = urlparse(prefect_api_url).port
    addresses = _listening_addresses(port)
    if not addresses and not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    assert addresses, f"nothing listens on port {port}"
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses
    with socket.socket() as wide:  # positive control: a socket on every interface is seen as such
        wide.bind(("0.0.0.0", 0))
        wide.listen(1)
        assert _listening_addresses(wide.getsockname()[1]) == ["0.0.0.0"]
