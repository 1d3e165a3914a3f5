"""deploy/systemd: the unit has what the service needs and systemd-analyze accepts it; the
environment example holds placeholders only, under names the settings really read."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

from forecaster.config import load_settings
from tests.deploy.conftest import DEPLOY, binary, run

UNIT = DEPLOY / "systemd" / "forecaster.service"
ENV = DEPLOY / "systemd" / "forecaster.env.example"
EXEC = "/opt/forecaster/.venv/bin/forecaster"
FORECASTER = str(Path(sys.executable).with_name("forecaster"))


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, empty_lines_in_values=False
    )
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_the_daemon_as_a_user_and_stops_it_gently():
    s = _unit()["Service"]
    assert s["Type"] == "simple"
    assert s["ExecStart"] == f"{EXEC} run"
    assert s["EnvironmentFile"] == "/etc/forecaster/forecaster.env"
    assert s["Restart"] == "on-failure"
    assert s["KillSignal"] == "SIGTERM"
    assert s["KillMode"] == "mixed"  # the daemon stops its retrain process itself
    assert int(s["TimeoutStopSec"]) >= 120  # a serving job over many series may take minutes
    assert s["User"] and s["User"] != "root"
    assert s["WorkingDirectory"].startswith("/var/lib/forecaster")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert s[key] == value, key
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = binary("systemd-analyze", "systemd")
    # verify wants ExecStart's binary to exist: the same unit with this checkout's.
    unit = tmp_path / "forecaster.service"
    unit.write_text(UNIT.read_text().replace(EXEC, FORECASTER))
    out = run([analyze, "verify", str(unit)], cwd=tmp_path)
    assert "forecaster.service" not in out, out  # no warning about our unit
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    level = re.search(r"Overall exposure level for forecaster\.service: ([\d.]+)", security.stdout)
    assert level, security.stdout + security.stderr
    assert float(level[1]) < 5.0  # "OK" or better; 10 is an unhardened unit


def _example() -> dict[str, str]:
    """KEY=VALUE lines, commented-out ones included (the token is one)."""
    return dict(re.findall(r"^#?(FORECASTER_\w+)=(.*)$", ENV.read_text(), flags=re.M))


def test_the_environment_example_holds_placeholders_only():
    env = _example()
    assert set(env) >= {"FORECASTER_DATABASE_URL", "FORECASTER_HTTP__TOKEN"}
    assert env["FORECASTER_HTTP__TOKEN"] == "CHANGE-ME"
    assert re.fullmatch(
        r"postgresql://forecaster:CHANGE-ME@[\w.]+:\d+/\w+", env["FORECASTER_DATABASE_URL"]
    )
    assert re.search(r"^#FORECASTER_HTTP__TOKEN=", ENV.read_text(), flags=re.M)  # off by default


def test_the_settings_read_every_variable_of_the_example(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no forecaster.toml here
    for key, value in _example().items():
        monkeypatch.setenv(key, value)
    settings = load_settings(None)
    env = _example()
    assert set(env) == {
        "FORECASTER_DATABASE_URL",
        "FORECASTER_HTTP__TOKEN",
        "FORECASTER_CHECKPOINT_DIR",
        "FORECASTER_LOG_FORMAT",
    }, "a new variable in the example: check it here"
    assert settings.database_url == env["FORECASTER_DATABASE_URL"]
    assert settings.http.token is not None
    assert settings.http.token.get_secret_value() == env["FORECASTER_HTTP__TOKEN"]
    assert settings.checkpoint_dir == env["FORECASTER_CHECKPOINT_DIR"]
    assert settings.log_format == env["FORECASTER_LOG_FORMAT"]
