"""Import rules that keep the house easy to live in (DESIGN.md), and the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import forecaster
import pipelines.sources

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("path", _modules("forecaster"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_pipelines(path):
    assert "pipelines" not in _top(_imports(path))


@pytest.mark.parametrize(
    "path", _modules("forecaster") + _modules("pipelines"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_only_the_store_and_schema_use_sqlalchemy(path):
    # The SQL source reads a user's database its own way; that is not our store.
    allowed = {ROOT / "forecaster" / "schema.py", ROOT / "pipelines" / "sources" / "sql.py"}
    if path not in allowed and (ROOT / "forecaster" / "store") not in path.parents:
        assert "sqlalchemy" not in _top(_imports(path)), f"{path} imports sqlalchemy"


@pytest.mark.parametrize(
    ("library", "allowed"),
    [
        ("apscheduler", {"pipelines/scheduler.py"}),
        ("prometheus_client", {"forecaster/metrics.py"}),
        ("ray", {"pipelines/backends/ray.py"}),
    ],
)
def test_single_owner_imports(library, allowed):
    owners = {
        str(p.relative_to(ROOT))
        for p in _modules("forecaster") + _modules("pipelines")
        if library in _top(_imports(p))
    }
    assert owners <= allowed


def test_public_api():
    assert sorted(forecaster.__all__) == [
        "CheckpointError",
        "ConfigError",
        "ForecasterError",
        "SchemaOutOfDateError",
        "Settings",
        "SourceError",
        "Store",
        "StoreError",
        "UnknownModelVersionError",
        "UnknownSeriesError",
        "UnknownSourceError",
        "load_settings",
    ]
    assert sorted(pipelines.sources.__all__) == ["Batch", "RAW_COLUMNS", "Source", "build_source"]
    for name in forecaster.__all__:
        assert getattr(forecaster, name) is not None


@pytest.mark.parametrize(
    "path", _modules("forecaster/store"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_store_formats_no_values_into_sql(path):
    """Every value is bound: no f-string, % or .format() builds SQL text in the store."""
    tree = ast.parse(path.read_text())
    sql_calls = {"execute", "exec_driver_sql", "text"}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in sql_calls
        ):
            for arg in node.args[:1]:
                assert not isinstance(arg, ast.JoinedStr), f"f-string SQL at line {node.lineno}"
                assert not (isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mod)), (
                    f"% SQL at line {node.lineno}"
                )
                assert not (
                    isinstance(arg, ast.Call) and getattr(arg.func, "attr", None) == "format"
                ), f".format SQL at line {node.lineno}"


@pytest.mark.parametrize(
    "path", _modules("forecaster/models"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_models_import_only_torch_and_their_own_config(path):
    allowed = {"__future__", "torch", "dataclasses", "typing", "math", "forecaster"}
    names = _imports(path)
    assert _top(names) <= allowed, names
    assert {n for n in names if n.startswith("forecaster")} <= {
        "forecaster.models",
        "forecaster.models.config",
        "forecaster.models.recurrent",
        "forecaster.models.seq2seq",
    }


def _module_level_imports(path: Path) -> set[str]:
    """Imports run when the module loads: those at its top level, not the ones inside
    functions or under `if TYPE_CHECKING:` / `if __name__ == "__main__":`."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path",
    ["pipelines/cli.py", "pipelines/cli_show.py", "pipelines/cli_run.py", "pipelines/demo.py"],
)
def test_the_command_line_loads_heavy_libraries_only_in_the_commands_using_them(path):
    """`forecaster --help` and the read commands start in a fraction of a second: the CLI's
    modules load typer, rich and the standard library; settings, the store, torch, the
    daemon and plotting load inside the commands (tests/pipelines/test_cli.py checks the
    modules a real `forecaster --help` imports)."""
    light = {"__future__", "collections", "contextlib", "datetime", "pathlib", "signal"}
    light |= {"sys", "threading", "typing", "typer", "rich", "forecaster", "pipelines"}
    names = _module_level_imports(ROOT / path)
    assert {n for n in names if n.split(".")[0] not in light} == set(), names
    assert "rich.progress" not in names
    ours = {n for n in names if n.split(".")[0] in ("forecaster", "pipelines")}
    assert ours <= {"forecaster.errors", "pipelines", "pipelines.cli"}, names


def test_importing_the_package_loads_neither_the_store_nor_the_settings():
    names = _module_level_imports(ROOT / "forecaster" / "__init__.py")
    assert names <= {"__future__", "typing", "forecaster.errors"}, names


@pytest.mark.parametrize(
    "path",
    [*sorted((ROOT / "forecaster" / "store").glob("*.py")), ROOT / "forecaster" / "errors.py"],
    ids=lambda p: p.name,
)
def test_the_store_and_the_errors_load_neither_polars_nor_structlog_at_import(path):
    """Every command imports the error classes, and the read commands the store: polars
    loads in the store methods that build frames, structlog in forecaster.log only (the
    errors mask with forecaster.masking), so `series list` does not pay for either."""
    names = _module_level_imports(path)
    assert {n for n in names if n.split(".")[0] in ("polars", "structlog")} == set(), names
    assert not names & {"forecaster.frames", "forecaster.log"}, names


@pytest.mark.parametrize("path", ["config_light.py", "log.py", "masking.py"])
def test_what_the_read_commands_configure_with_loads_neither_pydantic_nor_structlog(path):
    """The read commands take the database URL from forecaster.config_light and configure
    logging with forecaster.log on the first record: neither loads pydantic(-settings),
    structlog or the full settings when it is imported (test_cli checks a real command)."""
    names = _module_level_imports(ROOT / "forecaster" / path)
    heavy = {"pydantic", "pydantic_settings", "structlog"}
    assert {n for n in names if n.split(".")[0] in heavy} == set(), names
    assert "forecaster.config" not in names, names
