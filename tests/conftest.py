import os

import pytest
import torch

# `make test` runs the suite in 2 pytest-xdist workers: one torch thread each. The tests' models
# are small, so a second thread per process gains little, and 2 processes x 2 threads on 2 cores
# stall in each other's parallel regions. A plain `pytest` run keeps 2 threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def demo():
    """The shipped demo model, its tokenizer and world."""
    from factedit.models.loading import load_model
    from factedit.world.generate import World

    model, tok = load_model()
    return model, tok, World.load(model.name_or_path)


@pytest.fixture
def fp64_norms(monkeypatch):
    """Gemma's RMSNorms compute in float32 whatever the input's dtype (then cast back). For
    tests that compare float64 computations to ~1e-10, keep float64 inputs in float64: the
    same formula, x * rsqrt(mean(x^2) + eps) * (1 + w), in the input's dtype."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    for cls in (Gemma2RMSNorm, Gemma3RMSNorm):
        orig = cls.forward

        def forward(self, x, _orig=orig):
            if x.dtype != torch.float64:
                return _orig(self, x)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.double())

        monkeypatch.setattr(cls, "forward", forward)


@pytest.fixture
def fp64_softmax(monkeypatch, fp64_norms):
    """Most families' eager attention computes its softmax in float32 whatever the model's
    dtype (and Gemma's norms likewise, see `fp64_norms`). For tests that compare a batched
    intervention with one-row reference runs, keep float64 models in float64 throughout, so
    that the comparison tests the logic and not float32 rounding (which would otherwise reach
    ~1e-3 in % on these random models)."""
    orig = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if x.dtype == torch.float64:
            dtype = None
        return orig(x, dim=dim, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)
