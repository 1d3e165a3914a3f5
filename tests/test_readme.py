"""The README's two set-up commands: CI runs the test command exactly as written."""

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


BEGIN, END = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"


def test_the_readme_carries_the_generated_configuration_reference():
    from forecaster.config_reference import reference_markdown

    readme = (ROOT / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    carried = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert carried.strip() == reference_markdown().strip(), (
        "README's configuration reference is stale: regenerate it with "
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
