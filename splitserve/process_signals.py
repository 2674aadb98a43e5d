"""Signals in the worker processes: stopping is the gateway's job, and it ends quietly.

A terminal's Ctrl-C reaches every process of the foreground group, workers included; the gateway
then stops them in order (a Shutdown message, or SIGTERM while they start), so a worker ignores
SIGINT instead of printing a KeyboardInterrupt traceback. SIGTERM exits through SystemExit, once:
a second signal while unwinding, or one that lands inside a finalizer (zmq's `Context.__del__`,
where Python prints the exception as "ignored" and carries on), would be noise or lost.
"""

from __future__ import annotations

import os
import signal
import threading

_RETRY_S = 0.05


def _inside_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def exit_on_sigterm(signum, frame) -> None:
    if _inside_finalizer(frame):  # deliver it again once the finalizer has returned
        threading.Timer(_RETRY_S, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(0)


def ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet_worker_signals() -> None:
    """Both: what a spawned worker process installs."""
    ignore_ctrl_c()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
