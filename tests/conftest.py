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


# ---------------------------------------------------------------------------------------------------
# Serving fixtures (tests/test_handler.py, tests/test_torchserve_e2e.py), appended by the handler work.


@pytest.fixture(scope="session")
def tiny_converted_dir(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as the handler serves it: model.pth (float32) and model_int8.pth, with
    config.json and tokenizer.model beside them, as scripts/build_archive.py expects."""
    from gpt_fast_mixtral.checkpoint import convert_checkpoint
    from gpt_fast_mixtral.quantize import quantize_checkpoint

    out_dir = tmp_path_factory.mktemp("tiny_converted")
    model_pth = convert_checkpoint(tiny_checkpoint_dir, out_dir / "model.pth")
    quantize_checkpoint(model_pth, device="cpu")
    return model_pth.parent
