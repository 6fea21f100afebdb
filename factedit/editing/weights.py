"""Low-rank weight updates: ``WeightDelta`` maps a module's full name to factors (B, A) with
ΔW = B @ A, B (out, r) and A (r, in), in float32, whatever the module's storage layout.

Applying an update to a model keeps a copy of every weight it touches, so that removing it
restores the base weights bit for bit (adding and then subtracting ΔW in floating point
would not).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from factedit.errors import FactEditError


class NonFiniteEditError(FactEditError):
    pass


@dataclass
class WeightDelta:
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    conv1d: bool = False  # the modules store weights as (in, out) (GPT-2's Conv1D)

    def add(self, name: str, b: torch.Tensor, a: torch.Tensor) -> None:
        """ΔW += b @ a, with b (out, r) and a (r, in)."""
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"factors of {name}: b {tuple(b.shape)} and a {tuple(a.shape)} do not chain")
        self.factors.setdefault(name, []).append((b.detach().float().cpu(), a.detach().float().cpu()))

    def extend(self, other: WeightDelta) -> None:
        """Add all of ``other``'s updates to this one."""
        for name, parts in other.factors.items():
            for b, a in parts:
                self.add(name, b, a)

    def merged_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of all of a module's updates stacked: rank = sum of the parts' ranks."""
        bs, as_ = zip(*self.factors[name])
        return torch.cat(bs, 1), torch.cat(as_, 0)

    def compact(self) -> WeightDelta:
        """The same ΔW with rank at most min(out, in) per module (via SVD where stacking
        exceeded it), so that thousands of edits make an adapter of bounded size."""
        out = WeightDelta(conv1d=self.conv1d)
        for name in self.factors:
            b, a = self.merged_factors(name)
            if b.shape[1] > min(b.shape[0], a.shape[1]):
                u, s, vh = torch.linalg.svd((b.double() @ a.double()), full_matrices=False)
                r = int((s > s[0] * 1e-12).sum()) if s.numel() else 0
                b, a = (u[:, :r] * s[:r]).float(), vh[:r].float()
            out.factors[name] = [(b, a)]
        return out

    def dense(self, name: str) -> torch.Tensor:
        b, a = self.merged_factors(name)
        return b @ a  # (out, in)

    def modules(self) -> list[str]:
        return list(self.factors)

    def check_finite(self) -> None:
        for name, parts in self.factors.items():
            for b, a in parts:
                if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
                    raise NonFiniteEditError(
                        f"the update of {name} contains NaN or inf: nothing was saved; lower edit.fit.lr or "
                        "edit.fit.clamp, or check the request's target"
                    )

    def norms(self) -> dict[str, float]:
        return {n: float(self.dense(n).norm()) for n in self.factors}


@contextmanager
def applied(model: nn.Module, delta: WeightDelta) -> Iterator[None]:
    """The model with ``delta`` added to its weights; the exact base weights come back after."""
    saved = apply(model, delta)
    try:
        yield
    finally:
        restore(model, saved)


@torch.no_grad()
def apply(model: nn.Module, delta: WeightDelta) -> dict[str, torch.Tensor]:
    """Add ``delta`` in place; returns copies of the original weights for :func:`restore`."""
    saved: dict[str, torch.Tensor] = {}
    for name in delta.modules():
        mod = model.get_submodule(name)
        w = mod.weight
        saved[name] = w.detach().clone()
        d = delta.dense(name).to(device=w.device)
        if delta.conv1d:
            d = d.T
        if d.shape != w.shape:
            saved.pop(name)
            restore(model, saved)
            raise FactEditError(f"update of {name} has shape {tuple(d.shape)}, the weight {tuple(w.shape)}")
        wide = torch.promote_types(w.dtype, torch.float32)  # bf16/fp16 weights: add in float32
        w.copy_((w.to(wide) + d.to(wide)).to(w.dtype))
    return saved


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, w in saved.items():
        model.get_submodule(name).weight.copy_(w)
