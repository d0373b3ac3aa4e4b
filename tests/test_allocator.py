"""The allocator choice: which library GOPD_ALLOCATOR asks for, and the `gopd` command's one re-exec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gopd_core.allocator import (
    JEMALLOC_CONF,
    REEXEC_MARKER,
    AllocatorError,
    find_jemalloc,
    loaded_allocator,
    preload_environment,
)

CLI = [sys.executable, "-m", "gopd_core.cli"]


def test_system_choice_preloads_nothing():
    assert preload_environment({"GOPD_ALLOCATOR": "system", "LD_PRELOAD": "/x/libfoo.so"}) == {}


def test_a_library_path_is_preloaded_first_and_other_preloads_are_kept(tmp_path):
    library = tmp_path / "libmymalloc.so"
    library.write_bytes(b"")
    variables = preload_environment({"GOPD_ALLOCATOR": str(library), "LD_PRELOAD": f"/x/liba.so:{library}"})
    # ours first, the caller's after it, ours not twice; no MALLOC_CONF for a library that is not jemalloc
    assert variables == {"LD_PRELOAD": f"{library} /x/liba.so"}


def test_jemalloc_gets_its_reuse_setting_unless_the_user_set_one(tmp_path):
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    assert preload_environment({"GOPD_ALLOCATOR": str(library)})["MALLOC_CONF"] == JEMALLOC_CONF
    assert preload_environment({"GOPD_ALLOCATOR": str(library), "MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"


def test_a_missing_library_is_a_clear_error(tmp_path):
    with pytest.raises(AllocatorError, match="no such file"):
        preload_environment({"GOPD_ALLOCATOR": str(tmp_path / "nope.so")})


def test_loaded_allocator_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert loaded_allocator(maps) == "jemalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert loaded_allocator(maps) == "system"
    assert loaded_allocator(tmp_path / "absent") == "system"


def _cli_allocator(command: list[str] = CLI, **environ: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("LD_PRELOAD", "MALLOC_CONF", REEXEC_MARKER, "GOPD_ALLOCATOR")}
    return subprocess.run([*command, "allocator"], env={**env, **environ}, capture_output=True, text=True,
                          timeout=120)


def test_the_command_reexecutes_once_with_the_preload(tmp_path):
    # any real shared library shows the mechanism: the command starts again with it in LD_PRELOAD,
    # and the re-executed process (marked) does not start a third time
    library = next(Path(p) for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6",
                                     "/lib/aarch64-linux-gnu/libm.so.6") if Path(p).exists())
    done = _cli_allocator(GOPD_ALLOCATOR=str(library))
    assert done.returncode == 0, done.stderr
    assert "loaded: system" in done.stdout
    assert f"LD_PRELOAD={library}" in done.stdout
    assert "no allocator library is loaded" in done.stderr  # the re-executed process says what it found


def test_gopd_allocator_jemalloc_missing_fails_with_the_fix(tmp_path):
    if find_jemalloc() is not None:
        env = {"GOPD_ALLOCATOR": str(tmp_path / "libjemalloc.so.2")}  # a path that does not exist
        expected = "no such file"
    else:
        env = {"GOPD_ALLOCATOR": "jemalloc"}
        expected = "apt-get install libjemalloc2"
    done = _cli_allocator(**env)
    assert done.returncode == 2
    assert expected in done.stdout


@pytest.mark.skipif(find_jemalloc() is None and not os.environ.get("CI"),
                    reason="no libjemalloc.so.2 here (apt-get install libjemalloc2; .ci/run installs it)")
def test_the_command_runs_on_jemalloc_when_the_system_has_it():
    assert find_jemalloc() is not None, ".ci/run installs libjemalloc2: it is missing"
    done = _cli_allocator()
    assert done.returncode == 0, done.stderr
    assert "loaded: jemalloc" in done.stdout
    assert f"MALLOC_CONF={JEMALLOC_CONF}" in done.stdout
    assert "loaded: system" in _cli_allocator(GOPD_ALLOCATOR="system").stdout
    # `main` is for in-process callers (tests call it inside pytest): it never replaces their process
    in_process = _cli_allocator([sys.executable, "-c", "import sys; from gopd_core.cli import main; main()"])
    assert "loaded: system" in in_process.stdout, in_process.stderr
