import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def demo():
    """The shipped demo model, its tokenizer and world."""
    from factedit.models.loading import load_model
    from factedit.world.generate import World

    model, tok = load_model()
    return model, tok, World.load(model.name_or_path)
