"""The suite's parallel processes keep out of the way of the test that stops the PostgreSQL
server (tests/conftest.py): while a test holds the server to itself, no other process can
start a test; afterwards they can."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import _SERVER_LOCK, server_to_myself

# What pytest_runtest_protocol does before each test, without waiting.
_TRY_SHARED = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "try:\n"
    "    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)\n"
    "except BlockingIOError:\n"
    "    sys.exit(3)\n"
)


def _another_process_could_start_a_test() -> bool:
    done = subprocess.run([sys.executable, "-c", _TRY_SHARED, str(_SERVER_LOCK)], timeout=60)
    assert done.returncode in (0, 3), done
    return done.returncode == 0


def test_no_other_test_starts_while_one_holds_the_server():
    assert _another_process_could_start_a_test()
    with server_to_myself():
        assert not _another_process_could_start_a_test()
    assert _another_process_could_start_a_test()
