import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-initialised built-in-architecture model with the built-in tokenizer, saved as a checkpoint."""
    from unison.models import build_tokenizer, random_model, save_model

    return save_model(random_model(seed=1), build_tokenizer(), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def builtin_dir():
    from unison.models import resolve_model_dir

    return resolve_model_dir("builtin")
