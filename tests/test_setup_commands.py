"""The README's set-up commands: CI runs exactly the documented test command, and no link in the
docs leaves the repository through a relative path."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    block = readme.split("Install and run the test suite", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    ci_lines = [ln for ln in _read(".ci", "run").splitlines() if ln and not ln.startswith("#")]
    assert block.strip() == ci_lines[-1].strip()
    assert "torch==2.13.0" in block  # the reference machine's CPU build, from its local disk


def test_torch_is_a_range_that_the_ci_version_satisfies():
    pyproject = _read("pyproject.toml")
    (spec,) = re.findall(r'"torch([^"]*)"', pyproject)
    assert "==" not in spec and ">=" in spec
    low = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))
    assert low <= (2, 13, 0)


def test_doc_links_stay_inside_the_repository():
    for doc in ["README.md", "BENCHMARKS.md", *(os.path.join("docs", d) for d in os.listdir(os.path.join(ROOT, "docs")))]:
        if not doc.endswith(".md"):
            continue
        base = os.path.dirname(os.path.join(ROOT, doc))
        for target in re.findall(r"\]\(([^)#\s]+)", _read(doc)):
            if "://" in target:
                continue
            path = os.path.realpath(os.path.join(base, target))
            assert path.startswith(ROOT + os.sep), f"{doc} links outside the repository: {target}"
            assert os.path.exists(path), f"{doc} links to a missing file: {target}"
