"""Every beatlib setting, declared once in `Config`: name, type, default, parser, doc line.

Env vars BEATLIB_<NAME> win over keywords; every value is checked at construction (a bad one
raises `ConfigError`), then read as a plain slot attribute, cheap on hot paths.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import importlib
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from beatlib.sanitize import DEFAULT_FIELD_NAMES

logger = logging.getLogger("beatlib")

SERVICE_NAME_FALLBACK = "python-service"
# Script names that say nothing about the service: the folder they live in says more.
_GENERIC_SCRIPTS = {"manage", "__main__", "main", "app", "run", "wsgi", "asgi", "server"}


class ConfigError(ValueError):
    """A setting was given a value it does not accept (or does not exist)."""

    def __init__(self, setting: str, value: object, message: str, env_var: str | None = None):
        super().__init__(message)
        self.setting = setting
        self.value = value
        self.env_var = env_var  # set when the bad value came from the environment


@dataclasses.dataclass(frozen=True)
class Parser:
    accepts: str  # what is accepted, completing "<value> is not ..." in errors and docs
    parse: Callable[[Any], Any]  # raises ValueError, TypeError or OverflowError


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    type: str
    default: object  # as a user would write it ("10s"); None may mean "derived at run time"
    parser: Parser
    doc: str
    secret: bool = False

    @property
    def env_var(self) -> str:
        return "BEATLIB_" + self.name.upper()


def _number(value: object) -> float | None:
    """A real Python number as float (bools are not numbers here), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def boolean() -> Parser:
    words = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}

    def parse(value: object) -> bool:
        if isinstance(value, bool):
            return value
        word = words.get(str(value).strip().lower()) if isinstance(value, str | int) else None
        return _bad() if word is None else word

    return Parser("a boolean (true/false, 1/0, yes/no, on/off)", parse)


def integer(minimum: int) -> Parser:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            return _bad()
        number = int(value)
        return number if number >= minimum else _bad()

    return Parser(f"an integer >= {minimum}", parse)


def number(low: float, high: float, digits: int) -> Parser:
    def parse(value: object) -> float:
        parsed = _number(value)
        if parsed is None:
            parsed = float(value) if isinstance(value, str) else _bad()
        return round(parsed, digits) if low <= parsed <= high else _bad()

    return Parser(f"a number from {low:g} to {high:g}", parse)


def sample_rate() -> Parser:
    """A rate from 0 to 1 rounded half away from zero to 4 decimals (0.55555 -> 0.5556), a
    rate above 0 never to 0 (0.00001 -> 0.0001): the precision `tracestate` carries it with."""
    base = number(0, 1, 16)

    def parse(value: object) -> float:
        rate = base.parse(value)
        rounded = float(decimal.Decimal(repr(rate)).quantize(decimal.Decimal("0.0001"),
                                                             decimal.ROUND_HALF_UP))
        return 0.0001 if rate > 0 and rounded == 0 else rounded

    return Parser(base.accepts, parse)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(zero: bool = False, off: bool = False) -> Parser:
    """Seconds as float. Strings need a unit, except a bare 0 (if zero) and -1 (if off)."""
    bare = {"0"} if zero else set()
    bare |= {"-1"} if off else set()

    def parse(value: object) -> float:
        seconds = _number(value)
        if isinstance(value, str):
            text = value.strip()
            match = _DURATION.fullmatch(text)
            if match:
                seconds = float(match[1]) * _SECONDS[match[2].lower()]
            elif text in bare:
                seconds = float(text)
        if seconds is None or not math.isfinite(seconds):
            return _bad()
        if seconds > 0 or (seconds == 0 and zero) or (seconds == -1 and off):
            return seconds
        return _bad()

    extra = ", 0" if zero else ""
    extra += ", -1 to turn it off" if off else ""
    limit = "" if zero else "; more than 0"
    return Parser(f'a duration (use e.g. "10s", "500ms", "2m"{extra}{limit})', parse)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)", re.IGNORECASE)
_BYTES = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def size(minimum: int) -> Parser:
    """Bytes as int, 1024-based units; a Python int is taken as bytes."""

    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            count = value
        elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
            count = int(float(match[1]) * _BYTES[match[2].lower()])
        else:
            return _bad()
        return count if count >= minimum else _bad()

    return Parser(f'a size (use e.g. "768kb", "1mb", "2048b"; at least {minimum} bytes)', parse)


def names(lower: bool = False) -> Parser:
    def parse(value: object) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            return _bad()
        return tuple(i.strip().lower() if lower else i.strip() for i in items if i.strip())

    return Parser("a comma-separated string or a list of strings", parse)


def url() -> Parser:
    def parse(value: object) -> str:
        if not isinstance(value, str):
            return _bad()
        parts = urlsplit(value.strip())
        # .port raises ValueError on a port that is not a number or is out of range
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0:
            return _bad()
        return value.strip().rstrip("/")

    return Parser('an http(s) URL with a host (e.g. "http://127.0.0.1:8200")', parse)


def choice(*options: str) -> Parser:
    def parse(value: object) -> str | None:
        if value is None or value == "":
            return None
        text = value.strip().lower() if isinstance(value, str) else None
        return text if text in options else _bad()

    return Parser("one of " + ", ".join(options), parse)


def text(pattern: str | None = None, accepts: str = "a string") -> Parser:
    """An optional string: None (or "") means unset."""

    def parse(value: object) -> str | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str) or (pattern and not re.fullmatch(pattern, value)):
            return _bad()
        return value

    return Parser(accepts, parse)


def hook() -> Parser:
    """A callable, or its dotted path ("myapp.apm:scrub" or "myapp.apm.scrub"), imported now."""

    def parse(value: object) -> Callable[..., Any] | None:
        if value is None or value == "":
            return None
        if callable(value):
            return value
        if not isinstance(value, str):
            return _bad()
        module, sep, attr = value.strip().partition(":")
        if not sep:
            module, _, attr = module.rpartition(".")
        try:
            target: Any = importlib.import_module(module)
            for part in attr.split("."):
                target = getattr(target, part)
        except Exception:  # ImportError, AttributeError, or an error in the module itself
            return _bad()
        return target if callable(target) else _bad()

    return Parser('a callable or an importable "module:function" path', parse)


def header_safe() -> Parser:
    """A credential sent in an HTTP header: visible ASCII only (no spaces, newlines)."""
    return text(r"[\x21-\x7e]+", "a token of visible ASCII characters (no spaces or newlines)")


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


def headers() -> Parser:
    """HTTP headers: a dict, or "k=v,k2=v2" as OTEL_EXPORTER_OTLP_HEADERS writes them
    (values percent-decoded); names are HTTP tokens, values printable ASCII."""

    def parse(value: object) -> dict[str, str]:
        if value is None or value == "":
            return {}
        if isinstance(value, str):
            pairs = []
            for item in value.split(","):
                if not item.strip():
                    continue
                key, sep, val = item.partition("=")
                if not sep:
                    return _bad()
                pairs.append((key.strip(), unquote(val.strip())))
        elif isinstance(value, Mapping):
            pairs = list(value.items())
        else:
            return _bad()
        out = {}
        for key, val in pairs:
            if not (isinstance(key, str) and isinstance(val, str) and _HEADER_NAME.fullmatch(key)
                    and _HEADER_VALUE.fullmatch(val)):
                return _bad()
            out[key] = val
        return out

    return Parser('a dict of header names to values, or "name=value,name2=value2"', parse)


def service_name_parser() -> Parser:
    check = text(r"[A-Za-z0-9 _-]+", "a name of letters, digits, spaces, _ and -")

    def parse(value: object) -> str:
        return check.parse(value) or default_service_name()

    return dataclasses.replace(check, parse=parse)


def default_service_name(main_file: str | None = None) -> str:
    """A service name from the main script: its name, or its folder's for manage.py & co."""
    if main_file is None:
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        main_file = main_file or (sys.argv[0] if sys.argv else "")
    if main_file in ("", "-c", "-m", "-"):
        return SERVICE_NAME_FALLBACK
    path = Path(main_file).absolute()
    name = path.parent.name if path.stem in _GENERIC_SCRIPTS else path.stem
    return re.sub(r"[^A-Za-z0-9 _-]", "_", name).strip() or SERVICE_NAME_FALLBACK


def _bad() -> Any:
    raise ValueError


def _setting(default: object, parser: Parser, doc: str, secret: bool = False) -> Any:
    return dataclasses.field(metadata={"default": default, "parser": parser, "doc": doc,
                                       "secret": secret})


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclasses.dataclass(slots=True, init=False, repr=False)
class Config:
    """All settings, parsed. Keywords as attribute names; BEATLIB_<NAME> env vars win."""

    service_name: str = _setting(None, service_name_parser(),
                                  "Service name; default from the main script")
    service_version: str | None = _setting(None, text(), "Version of the service (release)")
    environment: str | None = _setting(None, text(), 'Environment name, e.g. "production"')
    hostname: str | None = _setting(None, text(), "Configured host name; None: detected")
    server_url: str = _setting("http://127.0.0.1:8200", url(), "APM server base URL")
    secret_token: str | None = _setting(None, header_safe(), "Sent as Bearer token",
                                        secret=True)
    api_key: str | None = _setting(None, header_safe(), "Sent as ApiKey authorization",
                                   secret=True)
    exporter: str = _setting("intake", choice("intake", "otlp"), "Wire protocol: intake "
                             "(Elastic APM intake v2 to server_url) or otlp (OTLP/HTTP JSON to "
                             "otlp_endpoint)")
    otlp_endpoint: str = _setting("http://127.0.0.1:4318", url(), "OTLP/HTTP base URL; "
                                  "/v1/traces, /v1/logs and /v1/metrics are appended")
    otlp_headers: dict[str, str] = _setting(None, headers(), "Headers sent with every OTLP "
                                            "request, e.g. api-key=abc (as "
                                            "OTEL_EXPORTER_OTLP_HEADERS)", secret=True)
    enabled: bool = _setting(True, boolean(), "False: record and send nothing")
    exporter_process: bool = _setting(False, boolean(), "Encode and send from a child process "
                                      "(off the app's GIL); records cross a Unix socket")
    transaction_sample_rate: float = _setting(1.0, sample_rate(),
                                              "Share of transactions recorded with spans")
    transaction_max_spans: int = _setting(500, integer(0), "Spans kept per transaction")
    flush_interval: float = _setting("10s", duration(), "Longest wait before sending events")
    max_request_size: int = _setting("768kb", size(1024), "Compressed size of one request")
    max_queue_events: int = _setting(10000, integer(1), "Events queued before dropping newest")
    max_buffer_size: int = _setting("32mb", size(1024),
                                    "Memory for unsent batches while the server is away")
    server_timeout: float = _setting("5s", duration(), "Deadline for one request to the server, "
                                     "reply included")
    shutdown_timeout: float = _setting("5s", duration(zero=True), "Time to flush at exit")
    verify_server_cert: bool = _setting(True, boolean(), "Verify the server's TLS certificate")
    server_ca_cert_file: str | None = _setting(None, text(), "CA bundle to verify the server")
    sanitize_field_names: tuple[str, ...] = _setting(
        DEFAULT_FIELD_NAMES, names(), "Names whose values are redacted (globs, `*` only); "
        "replaces the defaults")
    sanitize_field_names_extra: tuple[str, ...] = _setting(
        (), names(), "More names to redact, added to sanitize_field_names")
    capture_sql_literals: bool = _setting(False, boolean(), "Keep literals in db.statement "
                                          "(default: replaced by ?)")
    before_send: Callable[..., Any] | None = _setting(
        None, hook(), 'before_send(kind, event) -> event or None, or "module:function"')
    capture_locals: bool = _setting(True, boolean(), "Record local variables of app frames")
    source_lines_error_app_frames: int = _setting(5, integer(0),
                                                  "Source lines around app frames")
    source_lines_error_library_frames: int = _setting(0, integer(0),
                                                      "Source lines around library frames")
    local_var_max_length: int = _setting(200, integer(1), "Characters of a local's repr")
    local_var_list_max_length: int = _setting(10, integer(1), "Items of a list local kept")
    local_var_dict_max_length: int = _setting(10, integer(1), "Items of a dict local kept")
    max_string_length: int = _setting(1024, integer(1), "Characters of keyword fields")
    max_message_length: int = _setting(10000, integer(1), "Characters of error messages")
    stack_trace_limit: int = _setting(50, integer(-1), "Frames kept per stack; 0: none, -1: all")
    include_paths: tuple[str, ...] = _setting((), names(), "Module prefixes of app frames")
    exclude_paths: tuple[str, ...] = _setting((), names(), "Module prefixes of library frames")
    span_stack_trace_min_duration: float = _setting(
        -1, duration(zero=True, off=True), "Spans this long get a stack trace; 0: all, -1: none")
    log_level: str | None = _setting(None, choice(*_LOG_LEVELS), "Level of beatlib's own logger")
    instrument: bool = _setting(True, boolean(), "False: `instrument()` patches nothing")
    capture_body: str = _setting("off", choice("off", "errors", "transactions", "all"),
                                 "Request bodies recorded for errors, transactions or all")
    capture_headers: bool = _setting(True, boolean(), "Record request and response headers")
    transaction_ignore_urls: tuple[str, ...] = _setting(
        (), names(), "URL paths not traced (`*` wildcards, any case), e.g. /health*,/static/*")
    disabled_instrumentations: tuple[str, ...] = _setting(
        (), names(lower=True), "Instrumentations left off, e.g. jinja2,requests")
    assign_errors: bool = _setting(True, boolean(), "Run git blame on an error's culprit line "
                                   "for context.custom.assignee")

    def __init__(self, *, environ: Mapping[str, str] | None = None, **kwargs: object) -> None:
        self._load(kwargs, environ)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object],
                     environ: Mapping[str, str] | None = None) -> Config:
        """From a framework's settings dict; keys in lower or upper case."""
        kwargs: dict[str, object] = {}
        for key, value in mapping.items():
            name = str(key).lower()
            if name in kwargs:
                raise ConfigError(name, value, f"{name}: given twice (as {key!r} and in "
                                  "another case)")
            kwargs[name] = value
        config = cls.__new__(cls)
        config._load(kwargs, environ)
        return config

    @classmethod
    def settings(cls) -> tuple[Setting, ...]:
        """The declared settings, in order, for docs and tooling."""
        return _SETTINGS

    def _load(self, kwargs: dict[str, object], environ: Mapping[str, str] | None) -> None:
        environ = os.environ if environ is None else environ
        for env_name, meant in unknown_env_vars(environ):
            if env_name not in _warned_env:  # once per process: clients are made more than once
                _warned_env.add(env_name)
                hint = f" (did you mean {meant}?)" if meant else ""
                logger.warning("beatlib: %s is not a beatlib setting; ignored%s", env_name, hint)
        known = {s.name for s in _SETTINGS}
        for name in kwargs:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(name, kwargs[name], f"unknown setting {name!r}{hint}")
        for s in _SETTINGS:
            # An empty env var counts as unset: `FOO=` in compose files means "no value".
            env_value = environ.get(s.env_var) or None
            value = env_value if env_value is not None else kwargs.get(s.name, s.default)
            try:
                parsed = s.parser.parse(value)
            except (ValueError, TypeError, OverflowError):
                source = s.env_var if env_value is not None else None
                shown = "'***'" if s.secret else repr(value)
                origin = f" (from {source})" if source else ""
                message = f"{s.name}: {shown}{origin} is not {s.parser.accepts}"
                raise ConfigError(s.name, value, message, source) from None
            setattr(self, s.name, parsed)
        if self.max_buffer_size < self.max_request_size:
            message = (f"max_buffer_size: {self.max_buffer_size} is smaller than max_request_size "
                       f"({self.max_request_size}); use at least that, one batch must fit")
            raise ConfigError("max_buffer_size", self.max_buffer_size, message)

    def __repr__(self) -> str:
        def show(s: Setting) -> str:
            value = getattr(self, s.name)
            return "'***'" if s.secret and value else repr(value)

        return f"Config({', '.join(f'{s.name}={show(s)}' for s in _SETTINGS)})"


_SETTINGS = tuple(
    Setting(f.name, str(f.type), f.metadata["default"], f.metadata["parser"], f.metadata["doc"],
            f.metadata["secret"])
    for f in dataclasses.fields(Config)
)


_warned_env: set[str] = set()


# Variables of beatlib's commands, not of a client (`beatlib serve` reads BEATLIB_SERVE_*).
_OTHER_ENV_PREFIXES = ("BEATLIB_SERVE_",)


def unknown_env_vars(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """`BEATLIB_*` variables that name no setting (a typo is silently ignored otherwise),
    each with the variable it most likely meant."""
    known = [s.name.upper() for s in _SETTINGS]
    out = []
    for name in environ:
        given = name[len("BEATLIB_"):]
        if name.startswith(_OTHER_ENV_PREFIXES):
            continue
        if name.startswith("BEATLIB_") and given not in known:
            near = difflib.get_close_matches(given, known, n=1, cutoff=0.7)
            ending = [k for k in known if k.endswith("_" + given)] if given else []
            meant = ending[0] if ending else near[0] if near else None
            out.append((name, meant and "BEATLIB_" + meant))
    return sorted(out)
