"""Shared fixtures: a tiny tokenizer and a tiny Mixtral checkpoint, each built once per test session."""

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the package is used from the checkout, not installed

from gpt_fast_mixtral.tiny_model import make_tiny_model, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF-layout tiny Mixtral directory in float32, so reference comparisons are exact enough."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_mixtral"), seed=0, dtype=torch.float32)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
