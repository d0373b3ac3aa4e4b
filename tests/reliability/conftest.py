"""Fixtures of the reliability battery: one tiny world, one Prefect API, one uninterrupted reference run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import make_config
from tiny import World, build_world

import flows  # noqa: F401  (before Prefect itself: loopback host, start-up timeout, no analytics)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("reliability-world"))


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """The ephemeral Prefect server that in-process flows use, shared with flow subprocesses so that
    each of them skips starting its own (about ten seconds on a busy 2-core machine)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the singleton in-process flows talk to
    server.start(timeout=180)
    yield server.api_url
    # Stop it now, while pytest still captures output (at exit Prefect would log to a closed stream),
    # once the logs and events of in-process flows have been sent to it.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    server.stop()


@pytest.fixture(scope="session")
def reference_run(tiny_world, prefect_api_url) -> Path:
    """An uninterrupted 2-iteration distill run: the counts every interrupted run must reach."""
    from flows.distill import distill

    return Path(distill(config=make_config(tiny_world, "reference")))
