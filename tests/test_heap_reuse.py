"""A stage keeps the memory its steps free, instead of faulting it in anew each step (stage_server/heap_reuse.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from stage_server.cli import build_parser
from stage_server.heap_reuse import DEFAULT_KEEP_MB, keep_freed_memory

# Allocates, touches and frees a 40 MiB block a few times; prints the minor page faults of the last three.
FAULTS_OF_A_REPEATED_BLOCK = """
import ctypes, resource, sys
from stage_server.heap_reuse import keep_freed_memory
print(keep_freed_memory(int(sys.argv[1])), file=sys.stderr)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 40 << 20
def once():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_repeated_block(keep_mb: int) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REPEATED_BLOCK, str(keep_mb)], capture_output=True,
                          text=True, timeout=60, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_block_freed_and_asked_for_again_is_not_faulted_in_anew():
    pages = (40 << 20) // 4096
    assert faults_of_a_repeated_block(0) >= 2 * pages  # the C library's defaults: mapped afresh every time
    assert faults_of_a_repeated_block(256) < pages // 4  # kept: reused as it is


def test_zero_leaves_the_defaults_and_negative_is_refused():
    assert keep_freed_memory(0) is False
    with pytest.raises(ValueError, match=">= 0"):
        keep_freed_memory(-1)


def test_the_stage_cli_option(capsys):
    assert build_parser().parse_args(["--model", "m", "--layers", "0:1"]).heap_keep_mb == DEFAULT_KEEP_MB
    assert build_parser().parse_args(["--model", "m", "--layers", "0:1", "--heap-keep-mb", "0"]).heap_keep_mb == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--layers", "0:1", "--heap-keep-mb", "-5"])
    assert "expected a whole number >= 0" in capsys.readouterr().err
