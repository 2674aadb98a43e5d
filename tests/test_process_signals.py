"""Worker processes stop quietly: SIGINT is the gateway's to handle, SIGTERM exits once, even when
it lands inside a finalizer (where a SystemExit would be printed as "ignored" and lost)."""

from __future__ import annotations

import subprocess
import sys

PRELUDE = """
import os, signal, sys, time
from splitserve.process_signals import quiet_worker_signals
quiet_worker_signals()
"""


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, timeout=60)


def test_sigterm_inside_a_finalizer_still_exits_quietly():
    proc = _run("""
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200000):  # the handler runs here, inside __del__
            pass
Finalized()
time.sleep(10)
print("still running")
""")
    assert proc.returncode == 0
    assert "still running" not in proc.stdout
    assert proc.stderr == ""


def test_sigint_is_ignored_and_sigterm_exits_zero():
    proc = _run("""
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print("survived Ctrl-C", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
print("still running")
""")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == "survived Ctrl-C\n"
