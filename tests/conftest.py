from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))
