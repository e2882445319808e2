"""Compatibility tests against the real qmail (notqmail 1.09) built from ../shared/reference.

Run with ``make compat`` (or ``pytest tests/compat``, or PYQMAIL_COMPAT=1). They skip with
a reason when the reference is not available: no ../shared/reference, not root (the
build and the mount namespace need root), or no ``unshare``. They are not part of
``make test``.

The reference binaries have their home compiled in (/var/qmail-ref). To run them on a
test's control files without touching that shared home, each run happens in a private
mount namespace (``unshare -m``) where the test's directory is bind-mounted over
/var/qmail-ref/control.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REF_HOME = Path(os.environ.get("PYQMAIL_REF_HOME", "/var/qmail-ref"))
SHARED = Path(__file__).resolve().parents[3] / "shared" / "reference"
BUILD = SHARED / "build-qmail.sh"


def _requested(config: pytest.Config) -> bool:
    if os.environ.get("PYQMAIL_COMPAT") == "1":
        return True
    here = Path(__file__).resolve().parent
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == here or here in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _requested(config):
        return
    skip = pytest.mark.skip(reason="compat tests run only with `make compat` or PYQMAIL_COMPAT=1")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


class Reference:
    """The real qmail: run one of its programs on a given control directory."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def run(
        self,
        program: str,
        control: Path | None,
        *args: str,
        mounts: dict[str, Path] | None = None,
        stdin: bytes = b"",
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run bin/PROGRAM in HOME with ``control`` (and each of ``mounts``, a home
        subdirectory -> a test directory) bind-mounted over the shared home's."""
        binds = {"control": control} if control is not None else {}
        binds.update(mounts or {})
        script = "".join(
            f'mount --bind "{src}" "{self.home / sub}" && ' for sub, src in binds.items()
        )
        script += f'cd "{self.home}" && exec "$@"'
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(self.home / "bin" / program), *args]
        return subprocess.run(cmd, input=stdin, capture_output=True, timeout=60, env=env)


def ours(program: str) -> Path:
    """Our console script of that name (installed next to the running interpreter)."""
    import sys

    path = Path(sys.executable).parent / program
    if not path.exists():
        pytest.skip(f"our {program} is not installed")
    return path


@pytest.fixture(scope="session")
def reference() -> Reference:
    if os.geteuid() != 0:
        pytest.skip("compat tests need root (building qmail, mount namespaces)")
    if shutil.which("unshare") is None:
        pytest.skip("compat tests need unshare (util-linux)")
    if not (REF_HOME / "bin" / "qmail-showctl").exists():
        if not BUILD.exists():
            pytest.skip(f"no reference qmail: {REF_HOME}/bin is missing and {BUILD} is absent")
        p = subprocess.run([str(BUILD), str(REF_HOME)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.fail(f"building the reference qmail failed:\n{p.stdout}\n{p.stderr}")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -m is not permitted here")
    return Reference(REF_HOME)
