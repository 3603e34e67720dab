"""Git facts about the app: its revision, its releases, and who wrote the line an error came from.

Every git call is time-limited and quiet: outside a repository, without git, or past its timeout
the answer is None. `blame` runs on the transport's worker thread and is cached.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

GIT_TIMEOUT = 2.0  # seconds for one git call
MAX_COMMITS = 100  # commits listed in one release record
_REVISION_TTL = 30.0  # seconds a repository's HEAD is trusted before asking git again
_CACHE_LIMIT = 4096
_UNCOMMITTED = "0" * 40

_lock = threading.Lock()
_heads: dict[str, tuple[float, tuple[str, str] | None]] = {}  # dir -> (when, (top, HEAD))
_blames: dict[tuple[str, int, str], Assignee | None] = {}  # (file, line, HEAD) -> answer
_app_version: list[str | None] = []  # the start-up detection, once per process


@dataclasses.dataclass(frozen=True)
class Assignee:
    """Who last changed a line: the author, the commit and its date (ISO 8601)."""

    name: str
    email: str
    commit: str
    date: str


@dataclasses.dataclass(frozen=True)
class Commit:
    commit: str  # short hash
    author: str
    subject: str


@dataclasses.dataclass
class Release:
    """One deploy of a service: what went out, from where, and what changed since the last."""

    service: str
    version: str
    branch: str | None
    commit: str | None
    previous: str | None
    commits: list[Commit]
    deployed_at: str  # ISO 8601, UTC
    environment: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The body of `POST /beatlib/v1/releases` (see docs/releases.md)."""
        service = {"name": self.service}
        if self.environment:
            service["environment"] = self.environment
        out = dataclasses.asdict(self)
        del out["environment"]
        return {**out, "service": service}

    def annotation(self) -> dict[str, Any]:
        """The same release as a Kibana APM annotation body."""
        service = {"version": self.version}
        if self.environment:
            service["environment"] = self.environment
        return {"@timestamp": self.deployed_at, "service": service,
                "message": f"Deployment {self.version} ({len(self.commits)} commits)"}


def _git(args: list[str], cwd: str | None, timeout: float = GIT_TIMEOUT) -> str | None:
    """git's stdout, or None on any failure (no git, not a repo, non-zero exit, timeout)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd or None, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.decode("utf-8", "replace")


def app_dir() -> str:
    """The main script's folder, else the working directory."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return os.path.dirname(os.path.abspath(main)) if main else os.getcwd()


def detect_revision(path: str | None = None) -> str | None:
    """`git describe --tags --always --dirty` in `path` (default: the working directory);
    lightweight tags count, as `previous_tag` counts them."""
    out = _git(["describe", "--tags", "--always", "--dirty"], path)
    return (out.strip() or None) if out else None


def app_version() -> str | None:
    """The app's revision, detected once per process: the default of `service_version`."""
    with _lock:
        if not _app_version:
            found = detect_revision(app_dir())
            if found is None and app_dir() != os.getcwd():
                found = detect_revision(os.getcwd())
            _app_version.append(found)
        return _app_version[0]


def current_branch(path: str | None = None) -> str | None:
    """The checked-out branch; None when detached or outside a repository."""
    out = _git(["rev-parse", "--abbrev-ref", "HEAD"], path)
    name = out.strip() if out else None
    return name if name and name != "HEAD" else None


def previous_tag(path: str | None = None) -> str | None:
    """The newest tag before HEAD (HEAD's own tag is the release being made, not the last)."""
    out = _git(["describe", "--tags", "--abbrev=0", "HEAD^"], path)
    return (out.strip() or None) if out else None


def commits_since(previous: str | None, path: str | None = None) -> list[Commit]:
    """Commits reachable from HEAD and not from `previous` (all, if None), newest first."""
    spec = [f"{previous}..HEAD"] if previous else ["HEAD"]
    out = _git(["log", f"--max-count={MAX_COMMITS}", "--format=%h%x1f%an%x1f%s", *spec], path)
    commits = []
    for row in (out or "").splitlines():
        parts = row.split("\x1f")
        if len(parts) == 3:
            commits.append(Commit(*parts))
    return commits


def record_release(service: str, version: str | None = None, previous: str | None = None,
                   environment: str | None = None, path: str | None = None) -> Release:
    """The release at `path`'s HEAD; raises ValueError outside a repository without `version`."""
    head = _git(["rev-parse", "HEAD"], path)
    version = version or detect_revision(path)
    if not version:
        raise ValueError("no version given and no git revision found in "
                         f"{os.path.abspath(path or '.')} (use --version)")
    previous = previous or (previous_tag(path) if head else None)
    commits = commits_since(previous, path) if head else []
    when = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return Release(service, version, current_branch(path), head.strip() if head else None,
                   previous, commits, when, environment)


def _repository(directory: str, now: float) -> tuple[str, str] | None:
    """(top-level folder, HEAD commit) of the repository holding `directory`, briefly cached."""
    cached = _heads.get(directory)
    if cached is not None and now - cached[0] < _REVISION_TTL:
        return cached[1]
    out = _git(["rev-parse", "--show-toplevel", "HEAD"], directory)
    lines = out.split() if out else []
    found = (lines[0], lines[1]) if len(lines) == 2 else None
    if len(_heads) > _CACHE_LIMIT:
        _heads.clear()
    _heads[directory] = (now, found)
    return found


def blame(path: str, lineno: int, timeout: float = GIT_TIMEOUT) -> Assignee | None:
    """Author, commit and date of line `lineno` of `path`; cached per (file, line, HEAD).

    None outside a repository, for uncommitted lines, and when git is slower than `timeout`.
    """
    repo = _repository(os.path.dirname(os.path.abspath(path)), time.monotonic())
    if repo is None:
        return None
    key = (path, lineno, repo[1])
    if key in _blames:
        return _blames[key]
    out = _git(["blame", "-L", f"{lineno},{lineno}", "--porcelain", "--", path],
               os.path.dirname(os.path.abspath(path)), timeout)
    found = _parse_porcelain(out) if out else None
    if len(_blames) > _CACHE_LIMIT:
        _blames.clear()
    _blames[key] = found
    return found


def _parse_porcelain(out: str) -> Assignee | None:
    lines = out.splitlines()
    commit = lines[0].split(" ", 1)[0] if lines else ""
    if not commit or commit == _UNCOMMITTED:
        return None
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line and line[0] != "\t")
    try:
        tz = fields.get("author-tz", "+0000")
        offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[3:5])) * (-1 if tz[0] == "-" else 1)
        date = datetime.fromtimestamp(int(fields["author-time"]), timezone(offset)).isoformat()
    except (KeyError, ValueError, IndexError):
        return None
    return Assignee(fields.get("author", ""), fields.get("author-mail", "").strip("<>"),
                    commit, date)


def assign(error: dict[str, Any], snapshot: Any) -> None:
    """Put the blame of `snapshot`'s culprit line (an app frame) in the intake `error` dict
    as context.custom.assignee. Worker thread; never raises."""
    try:
        frames = snapshot.exception.frames if snapshot.exception else snapshot.log_frames
        frame = next((f for f in frames or () if not f.library_frame and f.lineno), None)
        if frame is None or not frame.abs_path or not os.path.isfile(frame.abs_path):
            return
        found = blame(frame.abs_path, frame.lineno)
        if found is not None:
            custom = error.setdefault("context", {}).setdefault("custom", {})
            custom["assignee"] = dataclasses.asdict(found)
    except Exception:  # an odd frame or git output must not cost the error event
        return
