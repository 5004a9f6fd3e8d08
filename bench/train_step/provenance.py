"""Which fastft code a run measured.

The device tool copies the working tree, and with it a ``.git`` that may be older than the files:
the commit it names (and "uncommitted changes" beside it) says little about the code that ran.
So each run also records the git tree hash of each library directory as the files stand, and
``python bench/train_step --find-commit RESULTS.json`` names the commit, in a clone that has it,
whose library directories are exactly those (the bench and the tests do not count).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
LIBRARY_DIRS = ("fastft", "kernels", "passes", "patterns")


def _git(root: Path, *args: str, env: Optional[dict] = None) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True,
                          env=env).stdout.strip()


def library_trees(root: Path = ROOT) -> dict[str, str]:
    """{directory: git tree hash} of the library directories as the files stand (ignored files
    left out, as git would), built in a scratch index: the repository's own index is not touched."""
    dirs = [d for d in LIBRARY_DIRS if (root / d).is_dir()]
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(scratch) / "index")}
        _git(root, "add", "-A", "--", *dirs, env=env)
        return {d: _git(root, "write-tree", f"--prefix={d}/", env=env) for d in dirs}


def commit_trees(commit: str, root: Path = ROOT) -> dict[str, str]:
    """{directory: git tree hash} of the library directories in ``commit``."""
    out = _git(root, "ls-tree", commit, "--", *LIBRARY_DIRS)
    return {line.split("\t")[1]: line.split()[2] for line in out.splitlines() if line.split()[1] == "tree"}


def find_commit(trees: dict[str, str], root: Path = ROOT, depth: int = 1000) -> Optional[str]:
    """The most recent of the last ``depth`` commits of HEAD whose library is ``trees``, or None."""
    for commit in _git(root, "rev-list", f"--max-count={depth}", "HEAD").split():
        if commit_trees(commit, root) == trees:
            return _git(root, "rev-parse", "--short", commit)
    return None


def git_info(root: Path = ROOT) -> dict[str, Any]:
    """The commit git names, whether the tree differs from it, and the library's trees."""
    try:
        commit = _git(root, "rev-parse", "--short", "HEAD")
        info: dict[str, Any] = {"commit": commit, "dirty": bool(_git(root, "status", "--porcelain"))}
    except Exception:  # noqa: BLE001  (a copy of the tree without .git, or without git)
        return {}
    try:
        info["library"] = library_trees(root)
        info["library_as_in_commit"] = info["library"] == commit_trees(commit, root)
    except Exception as error:  # noqa: BLE001  (a .git that takes no new objects): said in the record
        info["library_error"] = f"{type(error).__name__}: {str(error).strip()[:200]}"
    return info


def describe(git: dict[str, Any]) -> str:
    """The header's words for ``git_info``'s record."""
    if not git:
        return ""
    text = f"fastft tree at {git['commit']}" + (" + uncommitted changes" if git.get("dirty") else "")
    if "library_error" in git:
        text += f"; its library's trees could not be recorded ({git['library_error']})"
    elif "library_as_in_commit" in git:
        text += ("; its library (fastft/, kernels/, passes/, patterns/) as in that commit"
                 if git["library_as_in_commit"] else
                 "; its library differs from that commit: `python bench/train_step --find-commit` on this "
                 "JSON names the commit it matches")
    return text
