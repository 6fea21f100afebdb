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


@pytest.fixture
def fp64_softmax(monkeypatch):
    """Most families' eager attention computes its softmax in float32 whatever the model's
    dtype. For tests that compare a batched intervention with one-row reference runs, keep
    float64 models in float64 throughout, so that the comparison tests the logic and not
    float32 rounding (which would otherwise reach ~1e-3 in % on these random models)."""
    orig = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if x.dtype == torch.float64:
            dtype = None
        return orig(x, dim=dim, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)
