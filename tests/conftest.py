import pytest
import torch

import unison.offline  # noqa: F401 - the command line's environment (offline, no library progress bars), as in `unison`

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
