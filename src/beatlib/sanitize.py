"""Redaction of secrets in everything beatlib ships, and never-raising text helpers.

`Sanitizer` holds one client's rules: field names matched against `sanitize_field_names`
(case-insensitive globs), and value detectors that find secrets in any text (credentials in
URLs, Bearer/Basic values, private keys, JWTs, well-known token shapes, card numbers, a value
after a word that announces it, `name=value` pairs with a sensitive name, SQL parameters in
database errors). It runs on the worker thread over captured data and never raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

REDACTED = "[REDACTED]"
_MARK = "…"

# Names whose values are redacted wherever they appear as a key (header, cookie, query or form
# parameter, JSON member, local variable, label, environment variable). `*` is the only
# wildcard; a leading `(?-i)` makes a pattern case-sensitive.
DEFAULT_FIELD_NAMES = (
    "*password*", "*passwd*", "pwd", "*_pwd", "*passphrase*", "*secret*", "*token*",
    "*auth*", "*session*", "*cookie*", "*csrf*", "*xsrf*", "*card*", "*credit*", "*cvv*",
    "*cvc*", "*otp*", "*signature*", "*sig", "*credential*", "*creds*", "*dsn*",
    "*conn*str*", "*private*", "*principal*", "*apikey*", "*api_key*", "*api-key*",
    "*access_key*", "*accesskey*", "*access-key*", "*_key_id", "*bearer*", "*jwt*",
    "*sid", "*sessid*", "*_sess", "sess", "code", "pin", "*_pin", "ssn", "*key",
)  # fmt: skip


def wildcard_matcher(patterns: Iterable[str]) -> Callable[[str], bool] | None:
    """A whole-text matcher for wildcard `patterns` (field names, URL paths), or None: `*`
    is the only wildcard (`?` is a plain character), case-insensitive unless a pattern
    starts with `(?-i)`."""
    parts = []
    for pattern in patterns:
        pattern = pattern.strip()
        sensitive_case = pattern.startswith("(?-i)")
        if sensitive_case:
            pattern = pattern[5:]
        if not pattern:
            continue
        regex = ".*".join(re.escape(piece) for piece in pattern.split("*"))
        parts.append(f"(?-i:{regex})" if sensitive_case else regex)
    if not parts:
        return None
    match = re.compile("|".join(parts), re.IGNORECASE | re.DOTALL).fullmatch
    return lambda name: match(name) is not None


# Every branch starts only where a token can start (not inside a word) and bounds what it
# scans, so that no text, however hostile, costs more than linear time: each branch is tried
# at each position, and an unbounded or backtracking one would make that quadratic.
_START = r"(?<![\w.+-])"
_TEXT = re.compile(
    r"""
      (?P<pem>-----BEGIN[ A-Z0-9]{0,20}PRIVATE\ KEY-----)(?:.*?(?P<pem_end>-----END[ A-Z0-9]{0,20}
          PRIVATE\ KEY-----)|.*\Z)
    | (?P<userinfo>START[a-zA-Z][\w+.-]{0,30}://[^\s:@/?#]{0,256}:)[^\s@/?#]{1,256}(?=@)
    | (?P<scheme>\b(?:Bearer|Basic|ApiKey|Negotiate)\s{1,3})(?P<cred>[\w.~+/=-]{8,4096})
    | (?P<jwt>STARTeyJ[\w-]{4,4096}\.eyJ[\w-]{0,8192}(?:\.[\w-]{0,8192})?)
    | (?P<shape>START(?:
          (?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b
        | (?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,512}
        | whsec_[A-Za-z0-9]{16,512}
        | gh[pousr]_[A-Za-z0-9]{20,512}
        | github_pat_[A-Za-z0-9_]{20,512}
        | glpat-[\w-]{20,512}
        | xox[abposre]-[A-Za-z0-9-]{10,512}
        | hooks\.slack\.com/services/[\w/]{1,512}
        | AIza[\w-]{30,512}
        | ya29\.[\w-]{20,4096}
        | SG\.[\w-]{16,512}\.[\w-]{16,512}
        | npm_[A-Za-z0-9]{30,512}
        | pypi-[\w-]{40,4096}
        | sk-(?:proj-|ant-|live-)?[A-Za-z0-9_-]{20,512}
        | \d{6,12}:AA[\w-]{30,512}
        | [MN][A-Za-z\d]{23,25}\.[\w-]{6}\.[\w-]{27,512}
        | SK[0-9a-f]{32}\b
        | AC[0-9a-f]{32}\b
        | shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}
        | dop_v1_[a-f0-9]{64}
        | hf_[A-Za-z]{30,512}
      ))
    | (?P<sqlparams>\[parameters:\ )[^\n]*
    | (?P<pgkey>\bKey\ \([^)\n]{0,512}\)=\()(?P<pgvalues>[^\n]*)
    | (?P<pgrow>\bFailing\ row\ contains\ \()(?P<pgrowvalues>[^\n]*)
    | (?P<mydup>\bDuplicate\ entry\ ')(?P<myvalue>[^\n]*)
    | (?P<card>(?<![\w.-])(?:\d[\ -]?){12,18}\d(?![\w-]))
    | (?P<key>(?<![\w.-])[A-Za-z_][\w.\-\[\]]{0,80})(?P<sep>["']?\s{0,3}(?:=>|=|:)\s{0,3})
    | (?P<word>\b(?:password|passwd|passphrase|pwd|secret|token|api[\ _-]?key|access[\ _-]?key
        |private[\ _-]?key|credentials?|otp|cvv|pin)\b)
      (?P<wsep>\s{1,3}(?:is|was|=|:)\s{1,3}|\s{1,3})
      (?P<wvalue>(?:(?:Bearer|Basic|ApiKey|Token)\s{1,3})?[^\s,;]{1,4096})
    """.replace("START", _START),
    re.VERBOSE | re.DOTALL | re.IGNORECASE,
)
# The value after a sensitive `name=` / `name:` (matched only then, so plain pairs cost nothing).
_VALUE = re.compile(
    r"""
      "(?:[^"\\\n]|\\.){0,4096}"
    | '(?:[^'\\\n]|\\.){0,4096}'
    | (?:(?:Bearer|Basic|ApiKey|Token|Digest)\s{1,3})?[^\s&;,"'<>(){}\[\]]{1,4096}
    """,
    re.VERBOSE | re.IGNORECASE,
)
_DB_VALUE_ENDS = {  # what follows the values in a database's error message, kept
    "pgvalues": re.compile(r"\)\ (?:already\ exists|is\ not\ present|conflicts)"),
    "pgrowvalues": re.compile(r"\)\.?$"),
    "myvalue": re.compile(r"'\ for\ key"),
}
# Cheap pre-check: text with none of these characters or words holds nothing _TEXT finds.
_MAYBE = re.compile(
    r"[=:@\-\[]|eyJ|\d[\d -]{11}|\b(?:password|passwd|passphrase|pwd|secret|token|key"
    r"|credential|otp|cvv|pin|bearer|basic|apikey|negotiate|AKIA|ASIA|sk_|rk_|pk_|gh|glpat"
    r"|xox|AIza|ya29|SG|npm_|pypi|whsec|hooks)",
    re.IGNORECASE,
)
_TRAILING = ".,;:!?)]}'\""

# SQL, as the span names' tokenizer reads it (instrumentation/sql.py uses it too). `$1` is
# PostgreSQL's positional parameter (asyncpg, SQLAlchemy's asyncpg dialect), not a literal.
SQL_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>--[^\n]*|\#[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<param>\$\d+)
    | (?P<string>'(?:[^'\\]|\\.|'')*(?:'|\Z)
                |[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z)
                |\$(?P<tag>\w*)\$.*?(?:\$(?P=tag)\$|\Z))
    | (?P<quoted>"(?:[^"]|"")*"?|`(?:[^`]|``)*`?|\[[^\]]*\]?)
    | (?P<word>[^\W\d]\w*(?:\$\w*)*)
    | (?P<number>\d[\w.]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
# Data whose keys are the app's (names of headers, cookies, fields, locals, labels): below
# these keys values are redacted by name too. Elsewhere keys are the schema's own.
FREE_FORM = frozenset(("headers", "cookies", "env", "body", "custom", "tags", "vars", "labels"))
# The context keys the schemas define; any other key under `context` is the app's own data.
_CONTEXT_KEYS = frozenset(("request", "response", "user", "db", "http", "destination",
                           "service", "message", "page", "cloud", "tags", "custom"))
# The members the schemas define for these contexts; any other key there is the app's own
# (`capture_exception(request={"password": ...})`), redacted by name as free-form data is.
_SCHEMA_MEMBERS = {
    "request": frozenset(("method", "url", "headers", "cookies", "body", "env", "socket",
                          "http_version")),
    "response": frozenset(("status_code", "headers", "finished", "headers_sent",
                           "transfer_size", "encoded_body_size", "decoded_body_size")),
    "user": frozenset(("id", "username", "email", "domain")),
}
IDS = frozenset(("id", "trace_id", "transaction_id", "parent_id"))
OWN_FIELDS = IDS | {"statement", "argv", "context"}
_CACHE_BYTES = 2 * 1024 * 1024  # cleaned texts kept (names, statements and URLs repeat)
_CACHE_TEXT = 2048  # longer texts are cleaned each time


_ROUTE_FILTERS = frozenset(("int", "float", "path", "re"))


def _route_rule(key: re.Match[str], value: re.Match[str]) -> bool:
    """`<name:filter>`: a route wildcard (Bottle's rules), its filter no secret."""
    start = key.start("key")
    return (start > 0 and key.string[start - 1] == "<" and key["sep"] == ":"
            and value.group().partition(":")[0] in _ROUTE_FILTERS)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class Sanitizer:
    """One client's redaction rules, compiled once; see the module docstring."""

    __slots__ = ("patterns", "sql_literals", "_match", "_names", "_texts", "_text_bytes",
                 "_plain", "_plain_bytes")

    def __init__(self, patterns: Iterable[str], sql_literals: bool = False) -> None:
        self.patterns = tuple(p.strip() for p in patterns if p and p.strip())
        self.sql_literals = sql_literals  # True: db.statement keeps its literals
        self._match = wildcard_matcher(self.patterns)
        self._names: dict[str, bool] = {}
        self._texts: dict[str, str] = {}
        self._text_bytes = 0
        self._plain: dict[str, str] = {}  # statements with their literals as `?`
        self._plain_bytes = 0

    @classmethod
    def from_config(cls, config: Any) -> Sanitizer:
        """A client's rules: its field names (with the extra ones) and its SQL setting."""
        return cls(config.sanitize_field_names + config.sanitize_field_names_extra,
                   sql_literals=config.capture_sql_literals)

    def is_sensitive(self, name: object) -> bool:
        """Whether values under `name` are redacted."""
        if self._match is None or not isinstance(name, str):
            return False
        hit = self._names.get(name)
        if hit is None:
            hit = self._match(name.strip())
            if len(self._names) < 8192 and len(name) <= 256:  # names repeat; bounded anyway
                self._names[name] = hit
        return hit

    def text(self, s: str, values: frozenset[str] = frozenset()) -> str:
        """`s` with every secret the detectors find replaced by [REDACTED], the rest kept;
        `values` are known secrets of this event (e.g. a route's token), replaced verbatim."""
        for value in values:
            if value in s:
                s = s.replace(value, REDACTED)
        cached = self._texts.get(s)
        if cached is not None:
            return cached
        out = self._redact(s) if _MAYBE.search(s) else s
        if len(s) <= _CACHE_TEXT:
            if self._text_bytes > _CACHE_BYTES:
                self._texts.clear()
                self._text_bytes = 0
            self._texts[s] = out
            self._text_bytes += len(s) + len(out) + 100
        return out

    def _redact(self, s: str) -> str:
        out = []
        pos = 0
        search = _TEXT.search
        while (m := search(s, pos)) is not None:
            out.append(s[pos : m.start()])
            replacement, pos = self._replace(m)
            out.append(replacement)
        out.append(s[pos:])
        return "".join(out)

    def _replace(self, m: re.Match[str]) -> tuple[str, int]:
        """What stands for match `m`, and where the scan goes on."""
        end = m.end()
        if m.group("key") is not None:
            # Only the name and separator are consumed: a value that is not redacted is
            # scanned too (a URL with a token in it, a nested pair).
            if not self.is_sensitive(m["key"].strip("[]")):
                return m.group(), end
            found = _VALUE.match(m.string, end)
            if found is None or found.group().startswith(REDACTED) or _PLACEHOLDER.match(
                    m.string, end + (m.string[end:end + 1] in "'\"")) or _route_rule(m, found):
                return m.group(), end
            text = found.group()
            quote = text[0] if text[:1] in ("'", '"') and text[-1:] == text[0] else ""
            return f"{m['key']}{m['sep']}{quote}{REDACTED}{quote}", found.end()
        if m.group("pem") is not None:
            return f"{m['pem']}{REDACTED}{m['pem_end'] or ''}", end
        if m.group("userinfo") is not None:
            return m["userinfo"] + REDACTED, end
        if m.group("scheme") is not None:
            return (m["scheme"] + REDACTED if _looks_secret(m["cred"]) else m.group()), end
        if m.group("jwt") is not None or m.group("shape") is not None:
            return REDACTED, end
        if m.group("sqlparams") is not None:
            return f"{m['sqlparams']}{REDACTED}]", end
        for prefix, values in (("pgkey", "pgvalues"), ("pgrow", "pgrowvalues"),
                               ("mydup", "myvalue")):
            if m.group(prefix) is not None:
                tail = _DB_VALUE_ENDS[values].search(m[values])
                return m[prefix] + REDACTED + (m[values][tail.start():] if tail else ""), end
        if m.group("card") is not None:
            digits = re.sub(r"\D", "", m["card"])
            return (REDACTED if 13 <= len(digits) <= 19 and _luhn(digits) else m.group()), end
        value = m["wvalue"]
        core = value.rstrip(_TRAILING)
        if (not core or core == REDACTED or _PLACEHOLDER.match(value)
                or (not m["wsep"].strip() and not _looks_secret(core))):
            return m.group(), end
        return f"{m['word']}{m['wsep']}{REDACTED}{value[len(core):]}", end

    # -- structures ----------------------------------------------------------------------

    def clean(self, value: Any, keyed: bool = False, values: frozenset[str] = frozenset()
              ) -> Any:
        """A copy of an event (or part of one) with its secrets redacted: every text by value;
        below the FREE_FORM keys (or everywhere, if `keyed`) by key name as well."""
        t = type(value)
        if t is str:
            return self.text(value, values)
        if t is dict:
            return self._mapping(value, keyed, values)
        if t is list or t is tuple:
            return [self.clean(item, keyed, values) for item in value]
        if isinstance(value, str):
            return self.text(value, values)
        return value

    def _mapping(self, value: dict[Any, Any], keyed: bool, values: frozenset[str]
                 ) -> dict[Any, Any]:
        out = {}
        text = self.text
        for key, item in value.items():
            if keyed:
                if item is not None and self.is_sensitive(key):
                    out[key] = REDACTED
                    continue
            elif key == "statement" and value.get("type", "sql") != "sql":
                # A command of another kind of database (Redis): no SQL literals to replace.
                out[key] = self.clean(item, False, values)
                continue
            elif key in OWN_FIELDS:  # our ids and the fields that need their own rule
                out[key] = self._own(key, item, values)
                continue
            t = type(item)
            if t is str:
                out[key] = text(item, values)
            elif t is dict or t is list or t is tuple:
                out[key] = self.clean(item, keyed or key in FREE_FORM, values)
            else:
                out[key] = self.clean(item, keyed, values)
        return out

    def _own(self, key: str, item: Any, values: frozenset[str]) -> Any:
        if key in IDS:
            return item
        if key == "statement" and isinstance(item, str):
            return self.sql(item, values)
        if key == "argv" and isinstance(item, list):
            return self.argv(item)
        if key == "context" and isinstance(item, dict):
            return {k: self._context_member(k, v, values) for k, v in item.items()}
        return self.clean(item, False, values)

    def _context_member(self, name: Any, value: Any, values: frozenset[str]) -> Any:
        members = _SCHEMA_MEMBERS.get(name)
        if members is None or type(value) is not dict or value.keys() <= members:
            return self.clean(value, name in FREE_FORM or name not in _CONTEXT_KEYS, values)
        ours = self._mapping({k: v for k, v in value.items() if k in members}, False, values)
        apps = self._mapping({k: v for k, v in value.items() if k not in members}, True, values)
        return {k: (ours if k in members else apps)[k] for k in value}

    def sql(self, statement: str, values: frozenset[str] = frozenset()) -> str:
        """A SQL statement with its literals as `?` (unless `sql_literals`), then cleaned
        (each time: only the literals step is kept for a statement seen before)."""
        if not self.sql_literals:
            plain = self._plain.get(statement)
            if plain is None:
                plain = placeholders(statement)
                if len(statement) <= _CACHE_TEXT:
                    if self._plain_bytes > _CACHE_BYTES:
                        self._plain.clear()
                        self._plain_bytes = 0
                    self._plain[statement] = plain
                    self._plain_bytes += len(statement) + len(plain) + 100
            statement = plain
        for value in values:
            if value in statement:
                statement = statement.replace(value, REDACTED)
        parts = _COLUMN_PAIR.split(statement)
        if len(parts) == 1:
            return self.text(statement)
        # A column compared with a column (`authors.id = items.author_id`) is no name=value
        # pair to redact (`*auth*` would take it for one): kept, the text around it cleaned.
        return "".join(part if i % 2 else self.text(part) for i, part in enumerate(parts))

    def argv(self, args: Iterable[str]) -> list[str]:
        """Command-line arguments: `--password x` and `--password=x` redacted, values cleaned."""
        out: list[str] = []
        redact_next = False
        for arg in args:
            if redact_next and not arg.startswith("-"):
                out.append(REDACTED)
                redact_next = False
                continue
            redact_next = False
            name, eq, _ = arg.lstrip("-").partition("=")
            if arg.startswith("-") and name and self.is_sensitive(name.replace("-", "_")):
                if eq:
                    arg = f"{arg.partition('=')[0]}={REDACTED}"
                else:
                    redact_next = True
            out.append(self.text(arg))
        return out


_COLUMN_PAIR = re.compile(
    r"(?<![\w.$])([A-Za-z_][\w$]*\.[A-Za-z_][\w$]*\s*(?:=|<>|!=)\s*"
    r"[A-Za-z_][\w$]*\.[A-Za-z_][\w$]*)(?![\w.$])")


def placeholders(statement: str) -> str:
    """`statement` with every string and number literal replaced by `?`."""
    return SQL_TOKEN.sub(_placeholder, statement)


def _placeholder(m: re.Match[str]) -> str:
    kind = m.lastgroup
    return "?" if kind in ("string", "tag", "number") else m.group()


_PLACEHOLDER = re.compile(r"%(?:\(\w*\))?[-#0 +]*\d*(?:\.\d+)?[sdrifxXeEgGc]|\{[\w.:!]*\}|\?")


def _looks_secret(value: str) -> bool:
    """A word that could be a credential: not a plain lower-case English-like word, and not
    a format placeholder (`%s`, `{}`: a message template shows where a value goes)."""
    if _PLACEHOLDER.fullmatch(value):
        return False
    return (
        any(c.isdigit() for c in value)
        or any(not c.isalnum() for c in value)
        or (any(c.isupper() for c in value[1:]) and any(c.islower() for c in value))
        or len(value) >= 20
    )


def truncate(s: str, n: int) -> str:
    """`s` cut to at most `n` characters (marked with an ellipsis), with lone surrogates
    replaced so the result always encodes as UTF-8."""
    if n >= 0 and len(s) > n:
        s = s[: n - 1] + _MARK if n > 0 else ""
    if not s.isascii():
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s


def safe_repr(obj: object, max_len: int) -> str:
    """repr() cut to `max_len`; never raises, and never builds a huge repr of a str or bytes."""
    try:
        if isinstance(obj, str | bytes | bytearray) and len(obj) > max_len:
            return truncate(repr(obj[:max_len]), max_len)
        return truncate(repr(obj), max_len)
    except Exception:
        try:
            name = type(obj).__qualname__
        except Exception:
            name = "object"
        return truncate(f"<unrepresentable {name} object>", max_len)
