"""Shared fixtures. The tiny zoo is built once per test session (about half a minute on 2 CPU cores)."""

from __future__ import annotations

import pytest

from gopd_core.zoo import build_zoo


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """Path of a complete `tiny` zoo: tokenizer, prompt datasets and five small trained models."""
    root = tmp_path_factory.mktemp("zoo") / "tiny"
    build_zoo(root, preset="tiny", seed=0, progress=False, num_threads=None)  # keep the session's torch threads
    return root
