"""The README's quick start, run as written (only the demo made smaller and the CV shorter),
once per test session: tests/test_readme.py checks its commands and outputs, and
tests/test_browser_render.py renders the report and model card it produced.

The commands are read from README.md between ``<!-- quickstart -->`` and
``<!-- /quickstart -->``; each runs as ``python -m medtl.cli ...`` in a fresh folder that holds
a link to the checkout's ``pipelines/``, with its own HOME (the audit key goes there).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
# The fast settings the other end-to-end tests use; nothing else is changed.
FAST_ARGS = {
    "demo-data": ["--patients", "24", "--size", "64"],
    "train": [
        "--set", "transforms.spatial_size=[64,64]",
        "--set", "cv.folds=2",
        "--set", "evaluation.bootstrap=50",
        "--set", "evaluation.gallery_per_cell=2",
        "--set", "train.progress=false",
    ],
}  # fmt: skip


@dataclass
class Quickstart:
    """Where the quick start ran, each command with its completed process, the outputs named."""

    cwd: Path
    home: Path
    env: dict[str, str]
    steps: list[tuple[list[str], subprocess.CompletedProcess]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def path(self, named: str) -> Path:
        """A path as the README names it: relative to the folder, or under ``~``."""
        return self.home / named[2:] if named.startswith("~/") else self.cwd / named


def quickstart_section() -> str:
    text = README.read_text()
    m = re.search(r"<!-- quickstart -->(.*?)<!-- /quickstart -->", text, flags=re.S)
    if m is None:
        raise AssertionError("README.md has no <!-- quickstart --> ... <!-- /quickstart --> block")
    return m.group(1)


def quickstart_commands(section: str) -> list[list[str]]:
    """The shell commands of the section's code block (continuations joined, comments off)."""
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    if block is None:
        raise AssertionError("the quick start has no ```bash block")
    joined = re.sub(r"\\\n\s*", " ", block.group(1))
    return [shlex.split(ln, comments=True) for ln in joined.splitlines() if ln.strip()]


def named_outputs(section: str) -> list[str]:
    """The paths the prose after the block names in backticks."""
    prose = section.split("```", 2)[-1]
    return [p for p in re.findall(r"`([^`\s]+)`", prose) if "/" in p or "." in p]


_DONE: dict[Path, Quickstart] = {}


def run_quickstart(base: Path) -> Quickstart:
    """Run the quick start under ``base`` once (memoised per base folder); stops at the first
    failing command, which the caller's assertions then report."""
    if base in _DONE:
        return _DONE[base]
    section = quickstart_section()
    cwd, home = base / "quickstart", base / "home"
    cwd.mkdir(parents=True)
    home.mkdir()
    (cwd / "pipelines").symlink_to(ROOT / "pipelines")
    drop = {"MLFLOW_TRACKING_URI", "MEDTL_AUDIT_KEY", "MEDTL_AUDIT_KEY_FILE", "MEDTL_AUDIT_ANCHOR"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env |= {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    qs = Quickstart(cwd=cwd, home=home, env=env, outputs=named_outputs(section))
    _DONE[base] = qs
    for cmd in quickstart_commands(section):
        if cmd[0] != "medtl":
            raise AssertionError(f"the quick start runs only medtl commands, not {cmd}")
        args = [*cmd[1:], *FAST_ARGS.get(cmd[1], [])]
        p = subprocess.run(
            [sys.executable, "-m", "medtl.cli", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        qs.steps.append((cmd, p))
        if p.returncode != 0:
            break
    return qs
