"""Causal tracing against a naive one-pass-per-row reference and against facts that hold
without any reference: restoring the last hidden state restores the clean prediction, and
states before the subject are never corrupted."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from factedit.analysis.knockout import window_layers
from factedit.analysis.spans import TokenizedPrompt
from factedit.analysis.trace import causal_trace, embedding_noise
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout

from .families import FAMILIES, tiny_model

IDS = [5, 17, 23, 42, 8, 61, 9, 30]
TP = TokenizedPrompt("p", IDS, (2, 4))
TOL = 1e-10  # float64 models; batches of different shapes round differently at ~1e-15


def _naive(adapter: ModelLayout, kind: str, token: int, restore: dict[int, int], eps: torch.Tensor) -> float:
    """p(token) with the subject embeddings plus ``eps`` (n_subj, d) and, for each layer in
    ``restore``, the clean state at position ``restore[layer]``: one unbatched pass each."""
    model = adapter.model
    ids = torch.tensor([IDS])

    def module(la):
        return adapter.block(la) if kind == "hidden" else adapter.to_residual(kind, la)

    def first(o):
        return o[0] if isinstance(o, tuple) else o

    clean = {}
    hs = [module(la).register_forward_hook(lambda m, a, o, la=la: clean.__setitem__(la, first(o).clone()))
          for la in restore]
    model(input_ids=ids)
    for h in hs:
        h.remove()

    def corrupt(m, a, o):
        o = o.clone()
        o[0, 2:4] += eps
        return o

    def put(m, a, o, la):
        x = first(o).clone()
        x.view(1, len(IDS), -1)[0, restore[la]] = clean[la].view(1, len(IDS), -1)[0, restore[la]]
        return (x,) + tuple(o[1:]) if isinstance(o, tuple) else x

    hs = [model.get_input_embeddings().register_forward_hook(corrupt)]
    hs += [module(la).register_forward_hook(lambda m, a, o, la=la: put(m, a, o, la)) for la in restore]
    p = torch.softmax(model(input_ids=ids).logits[0, -1], -1)[token]
    for h in hs:
        h.remove()
    return float(p)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
@torch.no_grad()
def test_trace_matches_one_pass_per_row(family, kind):
    adapter = ModelLayout(tiny_model(family))
    L, S, noise = adapter.n_layers, 2, 0.7
    token = int(adapter.model(input_ids=torch.tensor([IDS])).logits[0, -1].argmax())
    r = causal_trace(adapter, TP, token, kind, positions=[1, 3, 5, 7], window=2, samples=S, noise=noise,
                     seed=1, max_rows=4)
    d = adapter.model.get_input_embeddings().weight.shape[1]
    eps = torch.randn(S, 2, d, generator=torch.Generator().manual_seed(1)) * noise
    p_corrupt = sum(_naive(adapter, kind, token, {}, eps[s].double()) for s in range(S)) / S
    assert r.p_corrupt == pytest.approx(p_corrupt, abs=TOL)
    k = 1 if kind == "hidden" else 2
    for c in range(L):
        for i, pos in enumerate(r.positions):
            restore = dict.fromkeys(window_layers(c, k, L), pos)
            p = sum(_naive(adapter, kind, token, restore, eps[s].double()) for s in range(S)) / S
            assert r.effect[c][i] == pytest.approx(p - p_corrupt, abs=TOL), (c, pos)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
@torch.no_grad()
def test_trace_facts_that_need_no_reference(family):
    adapter = ModelLayout(tiny_model(family))
    L = adapter.n_layers
    token = int(adapter.model(input_ids=torch.tensor([IDS])).logits[0, -1].argmax())
    r = causal_trace(adapter, TP, token, "hidden", samples=4, noise=1.0)
    last = r.positions.index(len(IDS) - 1)
    # the whole residual at the last position after the last block: the clean output
    assert r.effect[L - 1][last] == pytest.approx(r.total_effect, abs=TOL)
    for kind in ("hidden", "mlp", "attn"):  # nothing before the subject was corrupted
        r = causal_trace(adapter, TP, token, kind, samples=2, noise=1.0, window=2)
        assert all(abs(r.effect[la][r.positions.index(p)]) < TOL for la in range(L) for p in (0, 1))
    # batch shape does not matter: one row per batch and every row in one batch agree
    a = causal_trace(adapter, TP, token, "mlp", positions=[3, 7], samples=2, noise=1.0, max_rows=1)
    b = causal_trace(adapter, TP, token, "mlp", positions=[3, 7], samples=2, noise=1.0, max_rows=10_000)
    torch.testing.assert_close(torch.tensor(a.effect), torch.tensor(b.effect), atol=TOL, rtol=0)
    assert embedding_noise(adapter) > 0


def test_trace_refuses_bad_arguments():
    adapter = ModelLayout(tiny_model("gpt2"))
    with pytest.raises(FactEditError, match="kind"):
        causal_trace(adapter, TP, 0, "resid")
    with pytest.raises(FactEditError, match="positions"):
        causal_trace(adapter, TP, 0, positions=[99])
    with pytest.raises(FactEditError, match="samples"):
        causal_trace(adapter, TP, 0, samples=0)


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_trace_progress_counts_every_pass_and_shows_on_a_terminal_only(demo, monkeypatch, capsys):
    """causal_trace reports each batch's rows to the bar (trace_rows in all); trace() shows the
    bar, with its estimate, on a terminal and never with progress=False or off a terminal."""
    from factedit.analysis.trace import trace, trace_rows

    class Count:
        n = 0

        def update(self, k):
            self.n += k

    adapter = ModelLayout(tiny_model("gpt2"))
    bar = Count()
    causal_trace(adapter, TP, 0, "mlp", positions=[3, 7], samples=2, noise=1.0, max_rows=6, bar=bar)
    assert bar.n == trace_rows(adapter.n_layers, 2, 2)
    model, tok, _world = demo
    fact = dict(prompt="{} was born in", subject="Roric Dunnford", model=model, tokenizer=tok, kinds=("mlp",),
                samples=1)
    trace(**fact)  # stderr captured: not a terminal
    assert capsys.readouterr().err == ""
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    trace(**fact, progress=False)
    assert tty.getvalue() == ""
    trace(**fact)
    assert "causal tracing (mlp)" in tty.getvalue() and "100%" in tty.getvalue()


def test_trace_cli_and_locate_trace_field(tmp_path):
    """`factedit trace` writes trace.json and its figure; `locate --trace` stores the MLP trace at
    the last subject token in the circuit, equal to the trace command's column there."""
    import json

    from click.testing import CliRunner

    from factedit.analysis.circuit import RecallCircuit
    from factedit.cli import main

    fact = ["--prompt", "{} was born in", "--subject", "Roric Dunnford"]
    res = CliRunner().invoke(main, ["trace", *fact, "--kinds", "mlp", "--samples", "2", "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert (tmp_path / "t" / "trace.png").stat().st_size > 0
    t = rec["traces"]["mlp"]
    assert len(t["effect"]) == 8 and len(t["positions"]) == len(rec["tokens"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("analysis:\n  trace_samples: 2\n")
    res = CliRunner().invoke(main, ["locate", *fact, "--trace", "--recipe", str(recipe), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "causal trace" in res.output
    c = RecallCircuit.load(tmp_path / "c" / "circuit.json")
    last_subject = c.subject_span[1] - 1
    assert c.trace.positions == [last_subject] and c.trace.samples == 2
    col = t["positions"].index(last_subject)  # same noise, seed and window: the same numbers
    assert [row[0] for row in c.trace.effect] == pytest.approx([row[col] for row in t["effect"]], abs=1e-6)
    res = CliRunner().invoke(main, ["trace", *fact, "--kinds", "mlp,resid"])
    assert res.exit_code == 2 and "resid" in res.output


def test_edit_chooses_the_traced_mlp_layer(demo):
    """edit.mlp_site: trace puts the MLP update where the traced indirect effect peaks, among
    the recipe's candidate layers."""
    from factedit.analysis.circuit import LocateConfig
    from factedit.analysis.locate import locate
    from factedit.editing.config import EditConfig
    from factedit.editing.plan import plan_for

    model, tok, _ = demo
    c = locate("{} was born in", "Roric Dunnford", model=model, tokenizer=tok,
               config=LocateConfig(knockout_window=3, trace=True, trace_samples=2))
    effect = [row[0] for row in c.trace.effect]
    for cands in (None, [1, 2, 5]):
        cfg = EditConfig(method="mlp", mlp_site="trace", mlp_layers=cands)
        plan = plan_for(c, cfg, 8)
        assert plan.mlp_layer == max(cands or range(8), key=lambda la: effect[la])
        assert "causal-tracing" in plan.why
    with pytest.raises(Exception, match="mlp_site"):
        EditConfig(mlp_site="peak").validate()
