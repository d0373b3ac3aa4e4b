"""Prefect flows: thin wiring of `gopd_core.pipeline` stages into tasks.

Without PREFECT_API_URL the flows run against Prefect's ephemeral local server (loopback), which
we give time to start on a busy 2-core machine and keep from phoning home.
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
