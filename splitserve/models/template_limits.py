"""Bounds on rendering a chat template: work, value size, output size and wall-clock time.

jinja2's sandbox stops a template from reaching Python internals, but not from exhausting the
machine: `{{ 'ab ' * 10**8 }}` allocates gigabytes in one operation and nested `range` loops run
for as long as they like. A thread cannot be killed, so the bounds have to be checked from inside
the render, before each costly step:

- every loop item, call, filter and intercepted operator takes one unit of an operation budget
  and checks the deadline, so a runaway loop stops within one step of it;
- operators and filters that build strings or lists (`*`, `+`, `%`, `~`, `center`, `indent`,
  `join`, `replace`, `str.ljust`, `str.format`, ...) check the size of their result *before*
  building it, against a per-value cap, and every value built counts against a work budget;
- the rendered text is counted as it is produced and cut off at the output cap.

`bounded(limits)` installs a budget for the current thread; the environment reads it.
"""

from __future__ import annotations

import enum
import functools
import re
import string
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import jinja2
import jinja2.nodes as nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.visitor import NodeTransformer


class LimitKind(enum.Enum):
    OUTPUT = "output"  # the rendered text is too long
    VALUE = "value"  # one string or list would be too large
    WORK = "work"  # too many characters built in all
    OPERATIONS = "operations"  # too many loop items, calls and operators
    TIME = "time"


class RenderLimitError(jinja2.exceptions.TemplateError):
    def __init__(self, kind: LimitKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RenderLimits:
    max_output_chars: int = 1 << 22
    max_value_chars: int = 1 << 22  # one string / list; also bounds integer sizes and widths
    max_work_chars: int = 1 << 26
    max_operations: int = 500_000
    max_seconds: float = 5.0


class _Budget:
    __slots__ = ("limits", "ops_left", "work_left", "deadline")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.ops_left = limits.max_operations
        self.work_left = limits.max_work_chars
        self.deadline = time.monotonic() + limits.max_seconds

    def tick(self) -> None:
        self.ops_left -= 1
        if self.ops_left < 0:
            raise RenderLimitError(LimitKind.OPERATIONS, f"the template ran more than "
                                   f"{self.limits.max_operations} loop iterations, calls and operations")
        if time.monotonic() > self.deadline:
            raise RenderLimitError(LimitKind.TIME, f"the template took longer than {self.limits.max_seconds} s")

    def ensure(self, size: int) -> None:
        """Refuse to build a value of `size` characters (or items)."""
        if size > self.limits.max_value_chars:
            raise RenderLimitError(LimitKind.VALUE, f"the template would build a value of {size} characters "
                                   f"or items (at most {self.limits.max_value_chars})")

    def charge(self, value):
        if isinstance(value, (str, list, tuple, dict)):
            n = len(value)
            self.ensure(n)
            self.work_left -= n
            if self.work_left < 0:
                raise RenderLimitError(LimitKind.WORK, f"the template built more than "
                                       f"{self.limits.max_work_chars} characters in all")
        return value


_local = threading.local()


def _budget() -> _Budget:
    b = getattr(_local, "budget", None)
    # Outside `bounded` (constant folding at compile time): a fresh default budget per step
    # still enforces the per-value cap.
    return b if b is not None else _Budget(RenderLimits())


@contextmanager
def bounded(limits: RenderLimits):
    previous = getattr(_local, "budget", None)
    _local.budget = _Budget(limits)
    try:
        yield _local.budget
    finally:
        _local.budget = previous


def render_bounded(template: jinja2.Template, variables: dict, limits: RenderLimits) -> str:
    """Render with the budget of `limits`, counting the output as it is produced."""
    with bounded(limits) as budget:
        pieces, total = [], 0
        for piece in template.generate(**variables):
            total += len(piece)
            if total > limits.max_output_chars:
                raise RenderLimitError(LimitKind.OUTPUT, f"the rendered prompt is longer than "
                                       f"{limits.max_output_chars} characters")
            pieces.append(piece)
            budget.tick()
        return "".join(pieces)


# ---- size estimates, checked before a value is built ---------------------------------------------
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")
_NUMBER = re.compile(r"\d+")


def _check_percent_format(b: _Budget, fmt: str) -> None:
    widths = 0
    for m in _PERCENT_SPEC.finditer(fmt):
        if "*" in (m.group(1), m.group(2)):
            raise RenderLimitError(LimitKind.VALUE, "`*` widths are not allowed in templates")
        widths += sum(int(g) for g in (m.group(1), m.group(2)) if g)
    b.ensure(len(fmt) + widths)


def _check_brace_format(b: _Budget, fmt: str) -> None:
    widths = 0
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec:
            if "{" in spec:
                raise RenderLimitError(LimitKind.VALUE, "nested format fields are not allowed in templates")
            widths += sum(int(n) for n in _NUMBER.findall(spec))
    b.ensure(len(fmt) + widths)


def _sized(x) -> int | None:
    return len(x) if isinstance(x, (str, list, tuple)) else None


def _check_binop(b: _Budget, op: str, left, right) -> None:
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if _sized(seq) is not None and isinstance(n, int):
                b.ensure(len(seq) * max(n, 0))
        if isinstance(left, int) and isinstance(right, int):
            b.ensure((abs(left).bit_length() + abs(right).bit_length()) // 8)
    elif op == "+":
        if _sized(left) is not None and _sized(right) is not None:
            b.ensure(len(left) + len(right))
    elif op == "%":
        if isinstance(left, str):
            _check_percent_format(b, left)
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            b.ensure(right * abs(left).bit_length() // 8)


def _materialize(b: _Budget, items: Iterable) -> list:
    out = []
    for x in items:
        b.tick()
        out.append(x)
    return out


def _check_join(b: _Budget, sep: str, items: list) -> None:
    b.ensure(sum(len(str(x)) for x in items) + len(sep) * max(len(items) - 1, 0))


def _check_replace(b: _Budget, s: str, old: str, new: str, count=None) -> None:
    hits = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    b.ensure(len(s) + hits * max(len(new) - len(old), 0))


def _arg(args, kwargs, index: int, name: str, default):
    return args[index] if len(args) > index else kwargs.get(name, default)


# Each check sees the filter's own arguments (without jinja's context/environment argument)
# and may return replacement arguments (a materialized iterable).
def _filter_center(b, args, kwargs):
    b.ensure(int(_arg(args, kwargs, 1, "width", 80)))


def _filter_indent(b, args, kwargs):
    width = _arg(args, kwargs, 1, "width", 4)
    w = len(width) if isinstance(width, str) else int(width)
    b.ensure(len(str(args[0])) + w * (str(args[0]).count("\n") + 1))


def _filter_format(b, args, kwargs):
    _check_percent_format(b, str(args[0]))


def _filter_join(b, args, kwargs):
    items = _materialize(b, args[0])
    if _arg(args, kwargs, 2, "attribute", None) is None:
        _check_join(b, str(_arg(args, kwargs, 1, "d", "")), items)
    return (items, *args[1:])


def _filter_replace(b, args, kwargs):
    _check_replace(b, str(args[0]), str(args[1]), str(args[2]), _arg(args, kwargs, 3, "count", None))


def _filter_wordwrap(b, args, kwargs):
    s = str(args[0])
    width = max(int(_arg(args, kwargs, 1, "width", 79)), 1)
    wrap = _arg(args, kwargs, 3, "wrapstring", None) or "\n"
    b.ensure(len(s) + (len(s) // width + s.count("\n") + 1) * len(wrap))


def _filter_count_arg(index: int, name: str):
    def check(b, args, kwargs):
        b.ensure(int(_arg(args, kwargs, index, name, 0)))
    return check


def _filter_sum(b, args, kwargs):
    items = _materialize(b, args[0])
    start = _arg(args, kwargs, 2, "start", 0)
    if not isinstance(start, (int, float)):
        b.ensure(len(start) + sum(len(x) for x in items if _sized(x) is not None))
    return (items, *args[1:])


def _filter_tojson(b, args, kwargs):
    indent = _arg(args, kwargs, 2, "indent", None)
    if indent is not None:
        b.ensure(64 * (len(indent) if isinstance(indent, str) else int(indent)))


_FILTER_CHECKS = {
    "center": _filter_center, "indent": _filter_indent, "format": _filter_format, "join": _filter_join,
    "replace": _filter_replace, "wordwrap": _filter_wordwrap, "batch": _filter_count_arg(1, "linecount"),
    "slice": _filter_count_arg(1, "slices"), "sum": _filter_sum, "tojson": _filter_tojson,
}


def _bounded_filter(name: str, f):
    check = _FILTER_CHECKS.get(name)
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(f)
    def run(*args, **kwargs):
        b = _budget()
        b.tick()
        if check is not None:
            new = check(b, args[skip:], kwargs)
            if new is not None:
                args = (*args[:skip], *new)
        return b.charge(f(*args, **kwargs))

    return run


# ---- str methods reachable as attributes ----------------------------------------------------------
_DENIED_STR_METHODS = frozenset({"translate", "maketrans", "expandtabs"})


def _guard_str_method(s: str, name: str, method):
    def run(*args, **kwargs):
        b = _budget()
        b.tick()
        if name in ("ljust", "rjust", "center", "zfill") and args:
            b.ensure(int(args[0]))
        elif name == "join" and args:
            items = _materialize(b, args[0])
            _check_join(b, s, items)
            args = (items, *args[1:])
        elif name == "replace" and len(args) >= 2:
            _check_replace(b, s, str(args[0]), str(args[1]), args[2] if len(args) > 2 else kwargs.get("count"))
        elif name in ("format", "format_map"):
            _check_brace_format(b, s)
        return b.charge(method(*args, **kwargs))

    return run


# ---- the environment ---------------------------------------------------------------------------------
def _bounded_iter(items):
    b = _budget()
    for x in items:
        b.tick()
        yield x


def _bounded_concat(items):
    """`a ~ b ~ c`, with the size checked before the join."""
    b = _budget()
    parts = [str(x) for x in items]
    b.ensure(sum(len(p) for p in parts))
    return b.charge("".join(parts))


def _bounded_range(*args):
    _budget().tick()
    return safe_range(*args)


class _BoundLoops(NodeTransformer):
    """Every `for` iterates through `_bounded_iter`; every `~` goes through `_bounded_concat`."""

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_bounded_iter", [], [], None, None, lineno=node.iter.lineno)
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_bounded_concat", [], [], None, None,
                            lineno=node.lineno)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox with every costly step counted and size-checked (see module doc)."""

    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.globals.pop("lipsum", None)  # lipsum(n=10**9): text of any size, and no template needs it
        self.globals["range"] = _bounded_range
        self.finalize = self._charge_output

    def install_filters(self) -> None:
        """Wrap every filter (call after the caller has added its own)."""
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["_bounded_iter"] = _bounded_iter
        self.filters["_bounded_concat"] = _bounded_concat

    @staticmethod
    def _charge_output(value):
        b = _budget()
        b.charge(value if isinstance(value, str) else str(value))
        return value

    def _parse(self, source, name, filename):
        tree = _BoundLoops().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def is_safe_attribute(self, obj, attr, value) -> bool:
        if isinstance(obj, str) and attr in _DENIED_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def getattr(self, obj, attribute):
        value = super().getattr(obj, attribute)
        if isinstance(obj, str) and isinstance(attribute, str) and callable(value):
            return _guard_str_method(obj, attribute, value)
        return value

    def getitem(self, obj, argument):
        value = super().getitem(obj, argument)
        if isinstance(obj, str) and isinstance(argument, str) and callable(value):
            return _guard_str_method(obj, argument, value)
        return value

    def call_binop(self, context, operator, left, right):
        b = _budget()
        b.tick()
        _check_binop(b, operator, left, right)
        return b.charge(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        b = _budget()
        b.tick()
        return b.charge(super().call(__context, __obj, *args, **kwargs))
