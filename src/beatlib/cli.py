"""The `beatlib` command: `check` a configuration against its server, record a `release`,
start the local receiver (`serve`) or the demo (`demo`).

Exit codes: 0 done, 1 the server could not be reached or refused, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from beatlib.config import Config, ConfigError, unknown_env_vars
from beatlib.transport.http import is_html, path_hint, server_message
from beatlib.version import __version__

RELEASES_PATH = "/beatlib/v1/releases"
_CONNECTION = ("server_url", "service_name", "secret_token", "api_key", "environment")


class Failure(Exception):
    """A reason to stop, printed as is; `code` is the exit code."""

    def __init__(self, reason: str, code: int = 1) -> None:
        super().__init__(reason)
        self.code = code


def _config(args: argparse.Namespace) -> Config:
    """Settings from BEATLIB_* env vars, with the command line winning over them."""
    given = {n: getattr(args, n) for n in _CONNECTION if getattr(args, n, None) is not None}
    shadowed = {"BEATLIB_" + n.upper() for n in given}
    environ = {k: v for k, v in os.environ.items() if k not in shadowed}
    try:
        return Config(environ=environ, **given)
    except ConfigError as exc:
        raise Failure(f"bad configuration: {exc}", 2) from None


def _request(config: Config, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, str]:
    from beatlib.transport.http import ServerProblem, request

    try:
        return request(config, method, path, body, headers)
    except ServerProblem as exc:
        raise Failure(str(exc)) from None


def check(args: argparse.Namespace) -> int:
    from beatlib.protocol import intake_v2
    from beatlib.tracing import Tracer
    from beatlib.transport.http import INTAKE_PATH, ServerProblem, server_version

    config = _config(args)
    auth = "api key" if config.api_key else "secret token" if config.secret_token else "none"
    print(f"configuration: ok (service {config.service_name!r}, auth: {auth})")
    for name, near in unknown_env_vars(os.environ):
        hint = f"; did you mean {near}?" if near else ""
        print(f"warning: {name} is not a beatlib setting and is ignored{hint}")
    try:
        version = server_version(config) or "unknown"
    except ServerProblem as exc:
        raise Failure(str(exc)) from None
    print(f"server: {config.server_url} is up, version {version}")

    ended: list[Any] = []
    tracer = Tracer(config, ended.append, lambda: None)
    tracer.begin_transaction("check")
    tracer.end_transaction("beatlib check", "success")
    body = intake_v2.line("metadata", intake_v2.metadata(config)) + intake_v2.line(
        "transaction", intake_v2.transaction(ended[0]))
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
    status, text = _request(config, "POST", INTAKE_PATH, gzip.compress(body), headers)
    if status != 202:
        hint = ("; check secret_token / api_key" if status in (401, 403)
                else "; it does not look like an APM server" if is_html(text) else "")
        if status == 404:
            hint += path_hint(config.server_url)
        raise Failure(f"test event not accepted (HTTP {status}): {server_message(text)}{hint}")
    print("test event: accepted (HTTP 202)")
    return 0


def release(args: argparse.Namespace) -> int:
    from beatlib.release import record_release

    service = args.service_name or os.environ.get("BEATLIB_SERVICE_NAME")
    if not service:
        raise Failure("which service? give --service-name or BEATLIB_SERVICE_NAME, "
                      "the name the app reports", 2)
    config = _config(args)
    try:
        record = record_release(config.service_name, args.version, args.previous,
                                config.environment, args.path)
    except ValueError as exc:
        raise Failure(str(exc), 2) from None
    if args.kibana_annotation or args.dry_run:
        shown = record.annotation() if args.kibana_annotation else record.to_json()
        print(json.dumps(shown, indent=2))
        return 0
    body = json.dumps(record.to_json()).encode()
    status, text = _request(config, "POST", RELEASES_PATH, body,
                            {"Content-Type": "application/json"})
    if status == 404:
        raise Failure(f"{config.server_url} does not record releases (HTTP 404 on "
                      f"{RELEASES_PATH}); Elastic APM Server never does: record a Kibana "
                      "annotation instead (--kibana-annotation, see docs/releases.md)")
    if not 200 <= status < 300:
        raise Failure(f"release not recorded (HTTP {status}): {server_message(text)}")
    since = f" since {record.previous}" if record.previous else ""
    print(f"release {record.version} of {record.service} recorded "
          f"({len(record.commits)} commits{since})")
    return 0


# Commands other modules own, run as `module.main(argv)` and imported only when used.
_DELEGATED = {"serve": ("beatlib.receiver.server", "the local receiver"),
              "demo": ("beatlib.demo", "the demo")}


def _delegate(name: str, argv: list[str]) -> int:
    module, what = _DELEGATED[name]
    try:
        entry = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):
            raise
        raise Failure(f"{what} is not available in this installation ({module} is "
                      "missing)") from None
    return int(entry(argv) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beatlib", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"beatlib {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")

    def connection(sub: argparse.ArgumentParser) -> None:
        for name in _CONNECTION:
            sub.add_argument("--" + name.replace("_", "-"), dest=name,
                             help=f"default: BEATLIB_{name.upper()}")

    sub = commands.add_parser(
        "check", help="check the configuration and the server",
        description="Check what the app would do: parse the settings as the client does "
        "(naming a bad value and where it came from), ask the APM server for its version, "
        "then send one test transaction and say whether it was accepted. Exit code 0: all "
        "good; 1: the server could not be reached or refused; 2: bad configuration.")
    connection(sub)
    sub.set_defaults(run=check)
    sub = commands.add_parser(
        "release", help="record a release (deploy) of the service",
        description="Record a release of the service: its version and the git commits since "
        "the previous release, sent to the local receiver (beatlib serve), or printed as a "
        "Kibana annotation for Elastic APM Server. Exit code 0: recorded; 1: the server "
        "could not be reached or refused; 2: bad configuration or usage (no service name, "
        "no version and no git repository).")
    connection(sub)
    sub.add_argument("--version", help="default: git describe --tags --always --dirty")
    sub.add_argument("--previous", help="the previous release's tag or commit "
                     "(default: the newest tag before HEAD)")
    sub.add_argument("--path", help="the app's repository (default: the working directory)")
    sub.add_argument("--dry-run", action="store_true", help="print the release, send nothing")
    sub.add_argument("--kibana-annotation", action="store_true",
                     help="print the release as a Kibana APM annotation body, send nothing")
    sub.set_defaults(run=release)
    for name, (_, what) in _DELEGATED.items():  # listed for --help; main() runs them
        commands.add_parser(name, help=f"run {what} ({name} --help for its options)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    command = argv[0] if argv else None
    try:
        if command in _DELEGATED:  # their options are theirs: no parsing here
            return _delegate(command, argv[1:])
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.run(args))
    except Failure as exc:
        print(f"beatlib {command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
