"""The documentation site (docs/, mkdocs.yml): the strict build passes, and the code on its
pages runs, so the pages cannot drift from the code (docs/development.md, "This site").

A fenced block preceded by `<!-- docs-test: skip (reason) -->` is skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

SKIP_MARK = "docs-test:"
SKIP = re.compile(r"<!-- docs-test: skip \((?P<reason>[^)]+)\) -->\s*$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,})(?P<lang>[\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None
    marker: str  # the line before the fence

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def page_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a page, outermost only: a block shown inside a longer fence (an
    example of the syntax) is that fence's text, not a block of its own."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        close = re.compile(rf"^ *{fence}`*\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [x.removeprefix(indent) for x in lines[i + 1 : j]]
        marker = lines[i - 1] if i else ""
        skip = SKIP.search(marker)
        blocks.append(
            Block(
                page=path.name,
                line=i + 1,
                lang=m["lang"],
                code="\n".join(body) + "\n",
                skip=skip["reason"] if skip else None,
                marker=marker,
            )
        )
        i = j + 1
    return blocks


def blocks(lang: str) -> list[Block]:
    return [b for page in PAGES for b in page_blocks(page) if b.lang == lang]


def _section(page: str, heading: str) -> str:
    text = (DOCS / page).read_text()
    assert f"\n## {heading}\n" in text, f"docs/{page} has no '## {heading}' section"
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        reason = f"{module} is not installed (pip install -e '.[dev]')"
        if IN_CI:
            pytest.fail(f"CI=true requires {module}: {reason}")
        pytest.skip(reason)


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """An empty working directory, no FORECASTER_* variables, and whatever a block does to
    os.environ undone after it."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("FORECASTER_")]:
        monkeypatch.delenv(key)
    saved = dict(os.environ)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A SQLite store at the migrations' head, with no rows."""
    from forecaster.store import Store

    path = tmp_path_factory.mktemp("docs") / "empty.db"
    store = Store(f"sqlite:///{path}")
    store.upgrade()
    store.close()
    return path


# -- the build ----------------------------------------------------------------------------


def test_the_site_builds_in_strict_mode(tmp_path):
    """Strict: any warning fails, and mkdocs.yml's `validation` makes a broken link or
    #anchor between pages, and a page missing from the nav, warnings."""
    _require("mkdocs")
    _require("material")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", site],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for page in PAGES:
        built = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (site / built).is_file(), f"docs/{page.name} was not built"


def test_skip_markers_give_a_reason():
    bad = [str(b) for p in PAGES for b in page_blocks(p) if SKIP_MARK in b.marker and not b.skip]
    assert not bad, f"write <!-- docs-test: skip (reason) --> before these blocks: {bad}"


def test_the_pages_have_examples_to_run():
    # The parser must find what the pages hold: a regex gone wrong would make every test
    # below pass on nothing.
    assert len(blocks("python")) >= 2 and blocks("toml") and blocks("sql") and blocks("sh")


# -- the blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", blocks("python"), ids=str)
def test_python_block_runs(block, clean_env):
    if block.skip:
        pytest.skip(block.skip)
    exec(compile(block.code, str(block), "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("block", blocks("toml"), ids=str)
def test_toml_block_is_a_valid_configuration(block, clean_env):
    from forecaster import load_settings

    if block.skip:
        pytest.skip(block.skip)
    path = clean_env / "forecaster.toml"
    path.write_text(block.code)
    load_settings(path)


@pytest.mark.parametrize("block", blocks("sql"), ids=str)
def test_sql_block_runs_against_the_schema(block, empty_store):
    if block.skip:
        pytest.skip(block.skip)
    with sqlite3.connect(empty_store) as conn:
        for statement in block.code.split(";"):
            if statement.strip():
                conn.execute(statement).fetchall()


def _cli():
    import typer.main

    from pipelines.cli import app

    return app, typer.main.get_command(app)


def _options(command) -> dict[str, object]:
    return {
        opt: p
        for p in command.params
        if p.param_type_name == "option"
        for opt in (*p.opts, *p.secondary_opts)
    }


def _resolve(argv: list[str]) -> tuple[list[str], object]:
    """The command path `forecaster ARGV` names (["models", "list"]) and its command; fails
    on an unknown command or an option that command (or the root) does not have."""
    _, root = _cli()
    command, path, i = root, [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            param = {**_options(root), **_options(command)}.get(name)
            assert param is not None or name == "--help", (
                f"`forecaster {' '.join(path)}` has no option {name}"
            )
            if param is not None and not param.is_flag and "=" not in token:
                i += 1  # its value
        elif hasattr(command, "commands"):
            assert token in command.commands, (
                f"`forecaster {' '.join(path)}` has no command {token!r} "
                f"(it has {sorted(command.commands)})"
            )
            command = command.commands[token]
            path.append(token)
        i += 1
    return path, command


def _commands_in(block: Block) -> list[list[str]]:
    """The argv (after the program) of every `forecaster` command in a shell block."""
    found = []
    for line in block.code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in {"&&", "||", ";", "|", "&"}:
                if words and Path(words[0]).name == "forecaster":
                    found.append(words[1:])
                words = []
            else:
                words.append(token)
    return found


SH_COMMANDS = [(b, argv) for b in blocks("sh") for argv in _commands_in(b)]
RUN = {("config", "reference"), ("config", "show")}  # cheap, and read only


@pytest.mark.parametrize(
    ("block", "argv"), SH_COMMANDS, ids=[f"{b} {' '.join(a)}" for b, a in SH_COMMANDS]
)
def test_shell_command_exists(block, argv, clean_env):
    """Every `forecaster ...` in a shell block names a real command and only options it
    has; `--help` and the read-only config commands are run."""
    from typer.testing import CliRunner

    if block.skip:
        pytest.skip(block.skip)
    path, command = _resolve(argv)
    assert not hasattr(command, "commands") or "--help" in argv, (
        f"`forecaster {' '.join(argv)}` names a group of commands, not a command"
    )
    if "--help" in argv or tuple(path) in RUN:
        app, _ = _cli()
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output


def test_shell_blocks_name_forecaster_commands():
    assert len(SH_COMMANDS) >= 10, SH_COMMANDS


# -- the reference tables -----------------------------------------------------------------


def _leaf_paths(command, path=()) -> set[tuple[str, ...]]:
    if not hasattr(command, "commands"):
        return {path}
    return {p for name, sub in command.commands.items() for p in _leaf_paths(sub, (*path, name))}


def test_the_command_table_lists_every_command_and_only_real_options():
    _, root = _cli()
    rows = [
        line.split("`")[1]
        for line in _section("user-guide.md", "Command line").splitlines()
        if line.startswith("| `forecaster ")
    ]
    documented = set()
    for row in rows:
        words = row.replace("\\|", " ").split()[1:]
        path, command = _resolve([w for w in words if re.fullmatch(r"[a-z][a-z-]*", w)][:2])
        documented.add(tuple(path))
        for option in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", row):
            assert option in {**_options(root), **_options(command)}, (
                f"the command table shows {option} for `forecaster {' '.join(path)}`, "
                "which has no such option"
            )
    missing = sorted(" ".join(p) for p in _leaf_paths(root) - documented)
    assert not missing, f"docs/user-guide.md's command table lacks: {missing}"


def test_the_table_of_tables_lists_every_table_and_view(empty_store):
    with sqlite3.connect(empty_store) as conn:
        names = {
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                "AND name NOT LIKE 'sqlite_%' AND name != 'alembic_version'"
            )
        }
    section = _section("user-guide.md", "Tables (the SQL contract)")
    listed = set(re.findall(r"^\| (?:view )?`(\w+)`", section, flags=re.M))
    assert names - listed == set(), f"docs/user-guide.md's table of tables lacks {names - listed}"
    assert listed - names == set(), (
        f"docs/user-guide.md lists what the schema lacks: {listed - names}"
    )


def test_the_metrics_page_lists_every_metric(empty_store):
    from forecaster.clock import FixedClock
    from forecaster.config import MetricsSettings
    from forecaster.metrics import ServiceMetrics
    from forecaster.store import Store

    store = Store(f"sqlite:///{empty_store}")
    try:
        clock = FixedClock(datetime(2013, 1, 1, tzinfo=UTC))
        metrics = ServiceMetrics(store, MetricsSettings(), clock, job_ids=["predict"])
        families = list(metrics.registry.collect())
    finally:
        store.close()
    names = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert len(names) >= 15, names
    page = (DOCS / "metrics.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, f"docs/metrics.md does not describe {missing}"
