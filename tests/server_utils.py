"""The tests' server helper lives in `splitserve.testing` (the benchmark scripts use it too)."""

from splitserve.testing import ServerProcess, descendants, free_port, pid_alive, shm_files, wait_for

__all__ = ["ServerProcess", "descendants", "free_port", "pid_alive", "shm_files", "wait_for"]
