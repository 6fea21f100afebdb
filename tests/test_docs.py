"""The documentation names every command and option (`make test` also builds the site with
`mkdocs build --strict`, which checks its links and API references)."""

from pathlib import Path

import click
import pytest

from factedit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


COMMANDS = list(_commands(main))


def _pages() -> dict[str, str]:
    return {p.relative_to(ROOT / "docs").as_posix(): p.read_text() for p in (ROOT / "docs").rglob("*.md")}


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_is_on_a_page_that_names_its_command(path, cmd):
    name = f"factedit {' '.join(path)}"
    pages = {k: v for k, v in _pages().items() if name in v}
    assert pages, f"no page of docs/ names `{name}`"
    text = "\n".join(pages.values())
    missing = [o for p in cmd.params for o in p.opts if o.startswith("--") and o not in text]
    assert not missing, f"`{name}` options on no page that names it ({', '.join(sorted(pages))}): {missing}"


def test_every_command_is_in_the_readme_and_the_command_index():
    readme = (ROOT / "README.md").read_text()
    index = (ROOT / "docs" / "cli" / "index.md").read_text()
    for name in main.commands:
        assert f"`factedit {name}" in readme, name
        assert f"`factedit {name}" in index, name


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    assert pages
    assert not [p for p in pages if p not in nav]
