"""``factedit recipe``: what a recipe's settings are and do."""

from __future__ import annotations

import click

from factedit.editing.settings import GROUPS


@click.group()
def recipe() -> None:
    """Recipes: every edit setting, by group, with its type, unit, range, default and help."""


@recipe.command("explain")
@click.option("--recipe", "recipe_path", default=None, type=click.Path(dir_okay=False),
              help="Also show this recipe's value of each setting (its edit: section, validated).")
@click.option("--group", type=click.Choice(list(GROUPS)), default=None, help="Only this group's settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON rows.")
def explain_cmd(recipe_path: str | None, group: str | None, as_json: bool) -> None:
    """Print every edit setting by group: type, unit, valid values, default (and the recipe's
    value), the methods it acts in, and what it does. Experimental settings are marked."""
    from factedit.editing.config import explain, explain_rows, load_edit_config
    from factedit.io import dumps_json

    cfg = load_edit_config(recipe_path) if recipe_path else None
    if as_json:
        click.echo(dumps_json(explain_rows(cfg, group), indent=1))
    else:
        click.echo(explain(cfg, group, source="recipe"))
