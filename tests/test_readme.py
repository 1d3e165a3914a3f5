"""The README: its two set-up commands (CI runs the test command exactly as written), links
that resolve inside the repository, and the configuration reference on the docs page that
carries it (docs/configuration.md, generated from the settings model)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", quickstart, flags=re.S)


def test_quickstart_has_exactly_two_commands():
    cmds = _commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds)
    assert cmds[0].startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0")
    assert cmds[0].endswith("forecaster run --demo --until-end")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci


def test_the_development_page_shows_the_readme_test_command():
    assert _commands()[1] in (ROOT / "docs" / "development.md").read_text()


def test_the_readme_links_resolve_inside_the_repository():
    """Every relative link and image of the README names a file that is here; the docs
    pages' links are checked by the strict site build (tests/test_docs.py)."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert len(targets) >= 10, targets
    for target in targets:
        assert "://" not in target, f"the README links outside the repository: {target}"
        path = target.split("#", 1)[0]
        assert (ROOT / path).exists(), f"the README links to {path}, which does not exist"


def test_the_pages_name_only_files_that_exist():
    """A repository path in backticks (`deploy/README.md`) on the README or a docs page is a
    file or folder of this repository: the pages cite nothing outside it."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pattern = re.compile(r"`((?:\.?[\w-]+/)+[\w.-]*)`")
    named = {(p.name, m) for p in pages for m in pattern.findall(p.read_text())}
    assert len(named) >= 20, named
    missing = sorted((page, m) for page, m in named if not (ROOT / m).exists())
    assert not missing, f"these pages name paths the repository lacks: {missing}"


BEGIN, END = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"


def test_the_docs_carry_the_generated_configuration_reference():
    from forecaster.config_reference import reference_markdown

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page.count(BEGIN) == 1 and page.count(END) == 1
    carried = page.split(BEGIN, 1)[1].split(END, 1)[0]
    assert carried.strip() == reference_markdown().strip(), (
        "docs/configuration.md's configuration reference is stale: regenerate it with "
        "`forecaster config reference` and paste it between the markers"
    )


def _leaves(data: object, prefix: str) -> set[str]:
    if isinstance(data, dict) and data:
        return {k for key, v in data.items() for k in _leaves(v, f"{prefix}{key}.")}
    return {prefix.removesuffix(".")}


def test_the_reference_lists_every_key_of_the_settings():
    from forecaster.config import (
        FileSource,
        HttpJsonSource,
        PrometheusSource,
        ReplaySource,
        Settings,
        SqlSource,
    )
    from forecaster.config_reference import reference_sections

    keys = {r.key for _, rows in reference_sections() for r in rows}
    settings = Settings().model_dump()
    del settings["sources"]
    assert _leaves(settings, "") <= keys
    when = {"start": "2013-02-08T00:00:00Z", "end": "2013-02-09T00:00:00Z", "scale": 2}
    kinds = [
        ReplaySource(disruptions=[{"series": ["*"], **when}]),
        FileSource(path="x.csv"),
        HttpJsonSource(url="http://x"),
        SqlSource(url="sqlite://", query="SELECT 1"),
        PrometheusSource(url="http://x", query="up"),
    ]
    for source in kinds:
        dumped = source.model_dump()
        for d in dumped.pop("disruptions", []):
            assert _leaves(d, "sources.<name>.disruptions[].") <= keys
        assert _leaves(dumped, "sources.<name>.") <= keys, type(source).__name__
        assert "sources.<name>.disruptions" in keys
    rows = [r for _, rs in reference_sections() for r in rs]
    assert all(r.description for r in rows), [r.key for r in rows if not r.description]
    env = {r.key: r.env for r in rows}
    assert env["http.token"] == "FORECASTER_HTTP__TOKEN"
    assert env["sources.<name>.interval"] == "FORECASTER_SOURCES__<NAME>__INTERVAL"
