"""setuptools build hook: record medtl's version and git commit in the built package.

``pyproject.toml`` names these commands under ``[tool.setuptools.cmdclass]``. A wheel (and an
sdist, so a wheel built from it keeps the record) gets ``medtl/_build_info.py`` with
``VERSION``, ``COMMIT`` and ``DIRTY``, read from git at the source tree when the build runs.
``medtl.tracking.lineage.medtl_code_state`` reads it, so an installed medtl knows its own
commit wherever it runs. Editable installs get no file: they run the live source, whose
commit is read from git at run time instead (a frozen record would go stale). Written by hand
rather than with setuptools-scm because the version stays the one in ``pyproject.toml``; only
the commit is added.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

BUILD_INFO = Path("medtl") / "_build_info.py"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def build_info_text(version: str, source_root: Path) -> str | None:
    """The module text for ``version`` and the git state of ``source_root`` (None: no git).

    Dirty means tracked files under ``medtl/`` differ from the commit.
    """
    # Only a repository that tracks medtl's own source counts (not one an sdist was unpacked in).
    if _git(["ls-files", "--error-unmatch", "medtl/__init__.py"], source_root) is None:
        return None
    commit = _git(["rev-parse", "HEAD"], source_root)
    if not commit:
        return None
    changes = _git(["status", "--porcelain", "--untracked-files=no", "--", "medtl"], source_root)
    dirty = "unknown" if changes is None else str(bool(changes)).lower()
    return (
        '"""Written by build_hooks.py when this medtl was built; do not edit."""\n\n'
        f"VERSION = {version!r}\nCOMMIT = {commit!r}\nDIRTY = {dirty!r}\n"
    )


def _write(target_root: Path, version: str, source_root: Path) -> None:
    text = build_info_text(version, source_root)
    if text is None:  # no git (e.g. building from an sdist): keep what the sdist carries
        return
    target = target_root / BUILD_INFO
    target.unlink(missing_ok=True)  # sdist trees hard-link sources: never write through a link
    target.write_text(text)


class BuildPyWithInfo(build_py):
    """``build_py`` that adds ``medtl/_build_info.py`` to the built package (not editable)."""

    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            _write(Path(self.build_lib), self.distribution.get_version(), Path.cwd())


class SdistWithInfo(sdist):
    """``sdist`` whose tree carries ``medtl/_build_info.py`` (a git-less rebuild keeps it)."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        _write(Path(base_dir), self.distribution.get_version(), Path.cwd())
