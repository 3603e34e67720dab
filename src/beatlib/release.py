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
_heads: dict[str, tuple[float, str | None]] = {}  # folder -> (when asked, HEAD)
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
        out = dataclasses.asdict(self)
        env = out.pop("environment")
        return {**out, "service": {"name": self.service, **({"environment": env} if env else {})}}

    def annotation(self) -> dict[str, Any]:
        """The same release as a Kibana APM annotation body."""
        env = {"environment": self.environment} if self.environment else {}
        return {"@timestamp": self.deployed_at, "service": {"version": self.version, **env},
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


def _git_line(args: list[str], cwd: str | None) -> str | None:
    """The first line git prints, or None."""
    out = _git(args, cwd)
    return (out.strip().split("\n", 1)[0] or None) if out else None


def app_dir() -> str:
    """The main script's folder, else the working directory."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return os.path.dirname(os.path.abspath(main)) if main else os.getcwd()


def app_dirs() -> tuple[str, ...]:
    """Where the app's revision is looked for, as they are now: the main script's folder,
    then the working directory (none when the working directory was deleted)."""
    try:
        return tuple(dict.fromkeys((app_dir(), os.getcwd())))
    except OSError:  # a working directory deleted under the app
        return ()


def detect_revision(path: str | None = None) -> str | None:
    """`git describe --tags --always --dirty` in `path` (default: the working directory);
    lightweight tags count, as `previous_tag` counts them."""
    return _git_line(["describe", "--tags", "--always", "--dirty"], path)


def app_version(dirs: tuple[str, ...] | None = None) -> str | None:
    """The app's revision, detected once per process in the first of `dirs` (default:
    `app_dirs()`) that is in a repository: the default of `service_version`."""
    with _lock:
        if not _app_version:
            found = None
            for path in app_dirs() if dirs is None else dirs:
                try:
                    found = detect_revision(path)
                except OSError:
                    found = None
                if found:
                    break
            _app_version.append(found)
        return _app_version[0]


def current_branch(path: str | None = None) -> str | None:
    """The checked-out branch; None when detached or outside a repository."""
    name = _git_line(["rev-parse", "--abbrev-ref", "HEAD"], path)
    return name if name != "HEAD" else None


def previous_tag(path: str | None = None) -> str | None:
    """The newest tag before HEAD (HEAD's own tag is the release being made, not the last)."""
    return _git_line(["describe", "--tags", "--abbrev=0", "HEAD^"], path)


def commits_since(previous: str | None, path: str | None = None) -> list[Commit]:
    """Commits reachable from HEAD and not from `previous` (all, if None), newest first."""
    spec = [f"{previous}..HEAD"] if previous else ["HEAD"]
    out = _git(["log", f"--max-count={MAX_COMMITS}", "--format=%h%x1f%an%x1f%s", *spec], path)
    rows = [row.split("\x1f") for row in (out or "").splitlines()]
    return [Commit(*row) for row in rows if len(row) == 3]


def record_release(service: str, version: str | None = None, previous: str | None = None,
                   environment: str | None = None, path: str | None = None) -> Release:
    """The release at `path`'s HEAD. ValueError outside a repository without `version`, or
    when `previous` names no commit."""
    head = _git_line(["rev-parse", "--verify", "HEAD"], path)
    version = version or detect_revision(path)
    if not version:
        raise ValueError("no version given and no git revision found in "
                         f"{os.path.abspath(path or '.')} (use --version)")
    if previous and head and not _git_line(["rev-parse", "--verify", previous + "^{commit}"],
                                           path):
        raise ValueError(f"previous release {previous!r} is no tag or commit of the repository")
    previous = previous or (previous_tag(path) if head else None)
    commits = commits_since(previous, path) if head else []
    when = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return Release(service, version, current_branch(path), head, previous, commits, when,
                   environment)


def _head(directory: str, now: float) -> str | None:
    """HEAD of the repository holding `directory` (None outside one), briefly cached."""
    cached = _heads.get(directory)
    if cached is None or now - cached[0] >= _REVISION_TTL:
        if len(_heads) > _CACHE_LIMIT:
            _heads.clear()
        cached = _heads[directory] = (now, _git_line(["rev-parse", "--verify", "HEAD"], directory))
    return cached[1]


def blame(path: str, lineno: int, timeout: float = GIT_TIMEOUT) -> Assignee | None:
    """Author, commit and date of line `lineno` of `path`; cached per (file, line, HEAD).

    None outside a repository, for uncommitted lines, and when git is slower than `timeout`
    (remembered too: a slow file must not stall the worker at every error).
    """
    directory = os.path.dirname(os.path.abspath(path))
    head = _head(directory, time.monotonic())
    if head is None:
        return None
    key = (path, lineno, head)
    if key not in _blames:
        out = _git(["blame", "-L", f"{lineno},{lineno}", "--porcelain", "--", path],
                   directory, timeout)
        if len(_blames) > _CACHE_LIMIT:
            _blames.clear()
        _blames[key] = _parse_porcelain(out) if out else None
    return _blames[key]


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
        frame = snapshot.culprit_frame()
        if frame is None or frame.library_frame or not frame.lineno or not frame.abs_path \
                or not os.path.isfile(frame.abs_path):
            return
        found = blame(frame.abs_path, frame.lineno)
        if found is not None:
            custom = error.setdefault("context", {}).setdefault("custom", {})
            custom["assignee"] = dataclasses.asdict(found)
    except Exception:  # an odd frame or git output must not cost the error event
        return
