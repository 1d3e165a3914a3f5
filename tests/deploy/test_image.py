"""deploy/docker/Dockerfile built into a real image and run, here, with buildah.

No container registry is reachable from these machines and neither podman's nor crun's
containers can start, but buildah can build and run with chroot isolation. So the base is
made from Debian's own packages (debootstrap: bookworm, its python3 3.11 and venv module)
and passed as the BASE build argument; the default stays the public python image. torch
comes from this machine's pip configuration where it holds a local CPU build (pip's
find-links; the PyTorch index cannot be reached), with PyPI for the rest, read through the
machine's certificate bundle (PIP_CERT). Then, in containers of the image: `forecaster
--help`, `db upgrade` against the test PostgreSQL, and the demo's main job (`forecaster run
--demo --until-end`), whose store is read back from the container's file system.

Runs only with FORECASTER_TEST_IMAGE=1 (6 to 9 minutes on 2 cores, most of it the build: the
suite stays under 10 minutes without it). Then it needs root, buildah and debootstrap
(Debian packages) and the Debian mirror apt uses, and fails without them.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.deploy.conftest import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FORECASTER_TEST_IMAGE") != "1",
        reason="builds the container image (6-9 min): set FORECASTER_TEST_IMAGE=1",
    ),
]

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
SUITE = "bookworm"  # Debian 12: python3 is 3.11, as in the default base
MIRROR = os.environ.get("FORECASTER_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE = "localhost/forecaster-test-base:bookworm"
IMAGE = "localhost/forecaster:test"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("buildah with chroot isolation runs as root here")


def _run(args: list[str], *, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(args[:8])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"
        )
    return proc


def _local_torch_args() -> list[str]:
    """Build arguments for where torch comes from: a folder of pip's find-links that holds a
    torch wheel (with PyPI for its dependencies), else the Dockerfile's default index."""
    args: list[str] = []
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        if Path(folder).is_dir() and any(Path(folder).glob("torch-*.whl")):
            args += [
                "--build-arg",
                "TORCH_INDEX_URL=https://pypi.org/simple",
                "--build-arg",
                f"PIP_FIND_LINKS={folder}",
                "--volume",
                f"{folder}:{folder}:ro",
            ]
            break
    cert = os.environ.get("PIP_CERT")
    if cert and Path(cert).is_file():
        args += [
            "--build-arg",
            "PIP_CERT=/run/forecaster-build/ca.crt",
            "--volume",
            f"{cert}:/run/forecaster-build/ca.crt:ro",
        ]
    return args


@dataclass
class Image:
    buildah: list[str]  # buildah with this test's own storage

    def container(self) -> str:
        return _run([*self.buildah, "from", "--pull=never", IMAGE], timeout=120).stdout.split()[-1]

    def run(
        self, ctr: str, *command: str, volume: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """A command in the container, as the image's user and environment, on the host's
        network (chroot isolation has no network of its own); `volume`: host:container."""
        mounts = ["--volume", volume] if volume else []
        return _run(
            [*self.buildah, "run", "--isolation", "chroot", *mounts, ctr, "--", *command],
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[Image]:
    _need_root()
    buildah, debootstrap = shutil.which("buildah"), shutil.which("debootstrap")
    if buildah is None or debootstrap is None:
        pytest.fail("FORECASTER_TEST_IMAGE=1 needs buildah and debootstrap (apt-get install)")
    work = tmp_path_factory.mktemp("image")
    cmd = [buildah, "--root", str(work / "storage"), "--runroot", str(work / "run")]
    rootfs = work / "rootfs"
    boot = _run(
        [
            debootstrap,
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            SUITE,
            str(rootfs),
            MIRROR,
        ],
        timeout=900,
        check=False,
    )
    if boot.returncode != 0:
        pytest.fail(f"debootstrap {SUITE} from {MIRROR} failed: {boot.stderr[-500:]}")
    try:
        ctr = _run([*cmd, "from", "scratch"], timeout=60).stdout.strip()
        mnt = _run([*cmd, "mount", ctr], timeout=60).stdout.strip()
        _run(["cp", "-a", f"{rootfs}/.", mnt], timeout=300)
        _run([*cmd, "umount", ctr], timeout=60)
        _run([*cmd, "commit", "--quiet", ctr, BASE], timeout=300)
        _run([*cmd, "rm", ctr], timeout=60)
        shutil.rmtree(rootfs)
        _run(
            [
                *cmd,
                "build",
                "--isolation",
                "chroot",
                "--pull=never",
                "--file",
                str(DOCKERFILE),
                "--tag",
                IMAGE,
                "--build-arg",
                f"BASE={BASE}",
                *_local_torch_args(),
                str(ROOT),
            ],
            timeout=1500,
        )
        yield Image(cmd)
    finally:
        _run([*cmd, "rm", "--all"], timeout=120, check=False)
        _run([*cmd, "rmi", "--all", "--force"], timeout=300, check=False)


def test_the_image_runs_forecaster_as_its_own_user(image):
    ctr = image.container()
    helped = image.run(ctr, "forecaster", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage" in helped.stdout and "run" in helped.stdout
    who = image.run(ctr, "id", "-u")
    assert who.stdout.strip() == "10001", who.stdout + who.stderr  # the Dockerfile's USER
    # The build arguments that pointed pip elsewhere are not left in the image.
    env = image.run(ctr, "env").stdout
    assert "PIP_CERT" not in env and "PIP_FIND_LINKS" not in env, env
    # torch is the CPU build the Dockerfile asks for by default.
    torch = image.run(ctr, "python", "-c", "import torch; print(torch.__version__)")
    assert torch.returncode == 0 and torch.stdout.startswith("2."), torch.stdout + torch.stderr


@pytest.mark.postgres
def test_db_upgrade_from_the_image_reaches_head_on_postgresql(image, pg_url):
    ctr = image.container()
    url = pg_url.replace("postgresql+psycopg://", "postgresql://")
    out = image.run(ctr, "env", f"FORECASTER_DATABASE_URL={url}", "forecaster", "db", "upgrade")
    assert out.returncode == 0, out.stdout + out.stderr
    heads = sorted(p.name.split("_")[0] for p in (ROOT / "migrations" / "versions").glob("0*.py"))
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            views = {
                r[0]
                for r in conn.execute(
                    sa.text("SELECT table_name FROM information_schema.views")
                ).fetchall()
            }
    finally:
        engine.dispose()
    assert version == heads[-1], (version, heads[-1])
    assert {"latest_forecasts", "forecast_accuracy"} <= views


def test_the_demo_main_job_runs_in_the_image(image, tmp_path):
    # The image's volume, as a deployment mounts one: a folder its user owns.
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chown(volume, 10001, 10001)
    ctr = image.container()
    out = image.run(
        ctr,
        "forecaster",
        "run",
        "--demo",
        "--until-end",
        volume=f"{volume}:/var/lib/forecaster",
        timeout=1200,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "champion" in text, text[-4000:]
    # The store it wrote lies in the volume, owned by the image's user.
    store = volume / "forecaster-demo.db"
    assert store.is_file(), f"no {store}: {sorted(p.name for p in volume.iterdir())}"
    assert store.stat().st_uid == 10001
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
        series = conn.execute("SELECT count(*) FROM series").fetchone()[0]
        champions = conn.execute(
            "SELECT count(*) FROM model_versions WHERE stage = 'champion'"
        ).fetchone()[0]
        forecast = conn.execute(
            "SELECT count(DISTINCT series_id) FROM forecasts WHERE origin_ts = "
            "(SELECT max(origin_ts) FROM forecasts)"
        ).fetchone()[0]
    assert series >= 20 and champions == 1, (series, champions)
    assert forecast == series, (forecast, series)  # every series forecast at the last origin
