"""Shared fixtures. The tiny zoo is built once per test session (about half a minute on 2 CPU cores)."""

from __future__ import annotations

import os

import pytest

# Tests compare paths that must agree to ~1e-5 (scorer vs naive, the update's own scoring pass vs the
# scorer's, vLLM vs hf): on a CPU with native bf16, "auto" would score in bf16 and differ by ~1e-2.
# Every machine runs them in float32; tests of the bf16 paths ask for bf16 themselves.
os.environ["GOPD_PRECISION"] = "float32"

from gopd_core.zoo import build_zoo


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """Path of a complete `tiny` zoo: tokenizer, prompt datasets and five small trained models."""
    root = tmp_path_factory.mktemp("zoo") / "tiny"
    build_zoo(root, preset="tiny", seed=0, progress=False, num_threads=None)  # keep the session's torch threads
    return root
