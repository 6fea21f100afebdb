"""``docs/configuration.md``, generated from the edit settings' metadata.

Regenerate it with ``python -m factedit.editing.config_doc > docs/configuration.md``; a test
fails when the committed page differs from what this prints.
"""

from __future__ import annotations

from factedit.editing.config import EDIT_OPTIONS, EditConfig, explain_rows
from factedit.editing.settings import GENERAL, GROUPS, flat_mapping, specs

REGENERATE = "python -m factedit.editing.config_doc > docs/configuration.md"

HEAD = """\
# Recipes and configuration

<!-- Generated from the settings' metadata in factedit/editing/config.py: do not edit by hand.
     Regenerate with `{regenerate}`. -->

A recipe is a YAML file of hyperparameters. Its sections are read into validated dataclasses:

| section | dataclass | read by |
|---|---|---|
| `analysis:` | [`LocateConfig`](#factedit.analysis.circuit.LocateConfig) | `locate`, `trace` (via `locate --trace`), \
`verify`, `audit`, `study` |
| `edit:` | [`EditConfig`](#factedit.editing.config.EditConfig) | `edit` |
| `world:`, `model:`, `train:` | `WorldRecipe` (`factedit/world/recipe.py`) | `world train` (the demo model only) |

Nothing in a recipe is read silently wrong. An unknown or misspelled section or key is an error
that names the file, the closest valid name and the valid names; so are a wrong type, a
non-finite number, a value outside its range (the range is named), a layer beyond the model's
layers, and an `edit:` setting that does nothing for the chosen method (exit code 2, see
[Reliability](reliability.md)). YAML is read with `yaml.safe_load` only, at most 1 MiB and
100,000 values.

## Which recipe applies

1. `--recipe FILE` on the command line (or `config=` in Python) wins.
2. Otherwise the recipe that comes with the model:
    - the embedded demo model (and any world model) carries its recipe in `world.json`
      (`meta.recipe`);
    - a named real model (`--model smollm2-135m`) names its shipped recipe in
      `factedit-model.json`: `recipes/smollm2-135m.yaml`, `recipes/gemma3-270m.yaml`.
3. Otherwise the dataclass defaults; the knockout window then scales as 9 layers per 48 (the
   paper's window for GPT-2 XL).

A few options override one value: `--window` (the knockout window of `locate` and `audit`),
`--raw-unembed`, `--method`, `--mode`, `--stats-corpus`. `benchmarks/*.py` take
`--set KEY=JSON` for any `edit:` setting, by its Python name.

## The shipped recipes

Each file says, in its comments, where every value comes from (a paper's setting, or a
measurement on that model). Module paths never come from a recipe: they come from the
[family files](models/families.md).

| recipe | model | notes |
|---|---|---|
| `recipes/demo-world.yaml` | the embedded demo model | the world, the model and its training; `analysis:` and \
`edit:` as embedded in the checkpoint (batch and sequence `refit`, re-assertion) |
| `recipes/smollm2-135m.yaml` | SmolLM2-135M | knockout window 6, MLP layer 3 (causal tracing), batch layers 1-5, \
`site.max_heads: 0`, `site.lookup_position: subject`, `batch.lambda: 50`, `batch.insert_keys: contexts` |
| `recipes/smollm2-135m-fast.yaml` | SmolLM2-135M | the same with 10 context prefixes and 15 Adam steps: a \
third of the value fit's arithmetic, the same scores on 100 single edits ([edit cost](results/performance.md)) |
| `recipes/gemma3-270m.yaml` | Gemma-3-270M | knockout window 3, MLP layer 3 (causal tracing), `site.max_heads: 0`, \
batch with every context's key, three passes, λ 50 |
| `recipes/gpt2-xl.yaml` | GPT-2 XL | the paper's settings (window 9, sublayer window 11, read layer 40) and \
ROME's/MEMIT's |
| `recipes/gptj-6b.yaml`, `recipes/pythia.yaml`, `recipes/llama-3-8b.yaml`, `recipes/mistral-7b.yaml`, \
`recipes/qwen2-7b.yaml` | those models | analysis windows scaled from the paper's GPT-2 XL choices; edit layers \
from published or third-party settings, as each file states (not measured here) |

A recipe file for a model folder of your own (GPT-2 XL here):

```text
factedit locate --model path/to/gpt2-xl --recipe recipes/gpt2-xl.yaml \\
    --prompt "{{}} is owned by" --subject "Beats Music"
```

A named model brings its recipe; `recipe explain` shows a recipe's values beside the defaults:

```bash
echo '{{"prompt": "{{}} is located in the country of", "subject": "Indira Gandhi International Airport", \
"target_new": "Japan"}}' > r.jsonl
factedit edit --model smollm2-135m --requests r.jsonl --out e/      # reads recipes/smollm2-135m.yaml
```

```bash
factedit recipe explain --recipe recipes/smollm2-135m.yaml --group batch
```

```python
from factedit.analysis.circuit import load_locate_config
from factedit.editing.config import explain, load_edit_config

print(load_locate_config("recipes/smollm2-135m.yaml"))   # the analysis: section, a LocateConfig
cfg = load_edit_config("recipes/smollm2-135m.yaml")      # the edit: section, validated
print(explain(cfg, group="batch"))                        # every batch setting, with this recipe's value
```

## Environment variables

| variable | what it sets |
|---|---|
| `FACTEDIT_CACHE` | where key statistics, sampled corpora and pulled models are cached (default \
`~/.cache/factedit`: `stats/`, `corpora/`, `models/`) |
| `FACTEDIT_DEMO_CHECKPOINT` | the embedded demo model's folder, instead of the one found in the checkout or install |
| `FACTEDIT_DEBUG` | `1`: an internal error (exit code 3) prints its traceback |
| `FACTEDIT_REAL_MODELS` | the real models the test tier loads (default `smollm2-135m`; see \
[Development](development.md)) |

## `analysis:` fields

::: factedit.analysis.circuit.LocateConfig
    options:
      show_source: true
      members: false
"""

EDIT_INTRO = """\
## `edit:` settings

The `edit:` section is written by stage: `method` and `seed` directly under `edit:`, every other
setting in its group. In Python the same settings are plain attributes of `EditConfig`
(`config.batch_lambda`), named as in the last column of the [mapping](#old-flat-keys).

```yaml
edit:
  method: circuit
  site:
    mlp_layers: [3]
    lookup_position: subject
  keys:
    n_prefixes: 20
  fit:
    steps: 25
  batch:
    layers: [1, 2, 3, 4, 5]
    lambda: 50.0
```

Each setting acts in some methods only (the *methods* column). A recipe that sets one that
its method does not use (say `site.max_heads` with `method: lora`) is refused, naming the setting
and the method; the method checked is the recipe's `method` (default `circuit`), or
`factedit edit --method` when given with `--recipe`. When `--method` replaces the method of the
recipe that comes with the model, the settings it leaves unused are named in a warning.
Command-line options that do nothing for the method are refused as well:

| option | acts in |
|---|---|
{options}

*Experimental* settings are choices still under study: they work and are tested, but the
measurements so far do not settle them ([Results](results/index.md)), and they may
change or go.

`factedit recipe explain [--recipe FILE] [--group G]` prints the same as these tables (with a
recipe, its value of each setting); in Python, `factedit.editing.config.explain()` and
`explain_rows()`.

::: factedit.editing.config.EditConfig
    options:
      show_source: false
      members: false
"""

FLAT = """\
## Old flat keys

Recipes written before the groups keep working: a flat key under `edit:` is read as its grouped
key through this mapping, with a warning that names the new key. A flat key and its grouped key
in one recipe are an error. `method` and `seed` are the same in both forms.

| flat key (and Python attribute) | grouped key |
|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if text else ""


def _group_table(group: str) -> list[str]:
    out = [f"### {'General (directly under `edit:`)' if group == GENERAL else f'`{group}:`'}", "",
           GROUPS[group][0].upper() + GROUPS[group][1:] + ".", "",
           "| key | type | unit | valid values | default | methods | what it does |", "|---|---|---|---|---|---|---|"]
    for r in explain_rows(group=group):
        key = f"`{r['key']}`" + (" *(experimental)*" if r["experimental"] else "")
        valid = r["valid"] or ("true or false" if r["type"] == "bool" else "one of the values")
        out.append(f"| {key} | {_cell(r['type'])} | {_cell(r['unit'])} | {_cell(valid)} | `{_cell(r['default'])}` "
                   f"| {r['methods']} | {_cell(r['help'])} |")
    return out + [""]


def page() -> str:
    """The whole page, as committed."""
    options = "\n".join(f"| `{o}` | {', '.join(ms)} |" for o, ms in EDIT_OPTIONS.items())
    lines = [HEAD.format(regenerate=REGENERATE), EDIT_INTRO.format(options=options)]
    for group in GROUPS:
        lines += _group_table(group)
    lines.append(FLAT + "\n".join(f"| `{old}` | `{new}` |" for old, new in flat_mapping(EditConfig).items()))
    counts = ", ".join(f"{g} {sum(s.group == g for s in specs(EditConfig))}" for g in GROUPS)
    lines += ["", f"{len(specs(EditConfig))} settings in all: {counts}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(page(), end="")
