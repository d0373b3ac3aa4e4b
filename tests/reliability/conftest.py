"""Fixtures of the reliability battery: one tiny world, one Prefect API, one uninterrupted reference run."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import World, build_world, make_config


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("reliability-world"))


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """The ephemeral Prefect server that in-process flows use, shared with flow subprocesses so that
    each of them skips starting its own (about ten seconds on a busy 2-core machine)."""
    import flows  # noqa: F401  (its settings: loopback host, generous start-up timeout)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the singleton in-process flows talk to
    server.start()
    return server.api_url


@pytest.fixture(scope="session")
def reference_run(tiny_world, prefect_api_url) -> Path:
    """An uninterrupted 2-iteration distill run: the counts every interrupted run must reach."""
    from flows.distill import distill

    return Path(distill(config=make_config(tiny_world, "reference")))
