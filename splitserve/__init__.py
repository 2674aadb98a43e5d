"""splitserve: disaggregated LLM inference."""

__version__ = "0.1.0"

# The scheduler's modules compiled with mypyc, when `splitserve accel build` made a build of these
# exact sources (splitserve/accel.py); otherwise nothing happens and everything is pure Python.
from splitserve import accel as _accel  # noqa: E402

_accel.activate()
