"""SQL span names: a short signature of a statement ("SELECT FROM items", "INSERT INTO orders").

A small tokenizer skips comments (nested block comments too), string literals and quoting, so
names stay few (no values in them) and no table name is invented: when the statement is not
understood, or is DDL, or reads from a derived table, the signature is just its first keyword
(the names Elastic's agents give the same statements).
"""

from __future__ import annotations

from typing import Any

from beatlib.sanitize import SQL_TOKEN as _TOKEN

STATEMENT_LENGTH = 10000  # characters of a statement kept in span context

_INSERT_MODIFIERS = frozenset(
    ("IGNORE", "OR", "REPLACE", "LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY", "ROLLBACK", "ABORT",
     "FAIL")
)
_MAX_TOKENS = 2000  # signatures come from the start of a statement; enough for long CTEs


Token = tuple[str, str, str]  # (kind, upper-cased text, text as written)


def _tokens(sql: str) -> list[Token]:
    """word, ident (a quoted name, unquoted), punct, string or number tokens."""
    out: list[Token] = []
    pos, end, match_at = 0, len(sql), _TOKEN.match
    while pos < end and (match := match_at(sql, pos)) is not None:
        kind = match.lastgroup
        pos = match.end()
        if kind == "tag":  # the dollar-quote tag group ends inside a string match
            kind = "string"
        if kind == "comment" and sql.startswith("/*", match.start()):
            pos = _comment_end(sql, match.start())
        if kind in ("space", "comment"):
            continue
        text = match.group()
        if kind == "quoted":
            text = text[1:-1] if len(text) > 1 else ""
            out.append(("ident", text, text))
        elif kind in ("word", "punct"):
            out.append((kind, text.upper(), text))
        else:
            out.append((kind or "punct", "", ""))
        if len(out) >= _MAX_TOKENS:
            break
    return out


def _comment_end(sql: str, i: int) -> int:
    """Index just past the block comment opening at sql[i], nested ones included (as in
    PostgreSQL: `/* a /* b */ c */`); the end of the text if it never closes."""
    depth = 0
    closing = sql.find("*/", i + 2)
    while closing >= 0:
        opening = sql.find("/*", i, closing)  # only before the next closing: linear time
        if opening >= 0:
            depth += 1
            i = opening + 2
            continue
        depth -= 1
        i = closing + 2
        if depth == 0:
            return i
        closing = sql.find("*/", i)
    return len(sql)


# Apps repeat a few hundred statements; inlined literals just churn a cache. Each cache of
# this module is bounded by the characters it holds (statements can be long), and long
# statements are not kept at all.
CACHE_CHARS = 1024 * 1024
_CACHED_STATEMENT = 4096


class _Kept:
    """What was made of statements, by key (`items`, read directly on the hot path); emptied
    when the next statement would take it past CACHE_CHARS."""

    __slots__ = ("items", "chars")

    def __init__(self) -> None:
        self.items: dict[Any, Any] = {}
        self.chars = 0

    def put(self, key: Any, value: Any, statement: str, extra_chars: int = 0) -> None:
        if len(statement) > _CACHED_STATEMENT:
            return
        if self.chars + len(statement) > CACHE_CHARS:
            self.items.clear()
            self.chars = 0
        self.items[key] = value
        self.chars += len(statement) + extra_chars


_signatures = _Kept()


def signature(sql: str) -> str:
    """The signature of one statement; "" for an empty one. Cached: apps repeat statements."""
    cached = _signatures.items.get(sql)
    if cached is not None:
        return cached
    try:
        result = _signature(_tokens(sql), 0)
    except Exception:  # never let naming a span break a query
        return ""
    _signatures.put(sql, result, sql, len(result))
    return result


def _name(tokens: list[Token], i: int) -> str | None:
    """A possibly dotted table name starting at tokens[i], as written, or None."""
    parts = []
    while i < len(tokens) and tokens[i][0] in ("word", "ident"):
        parts.append(tokens[i][2])
        if i + 1 < len(tokens) and tokens[i + 1][1] == ".":
            i += 2
        else:
            break
    return ".".join(parts) if parts else None


def _closing(tokens: list[Token], i: int) -> int:
    """Index just past the parenthesis closing the one at tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j][1] == "(":
            depth += 1
        elif tokens[j][1] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(tokens)


def _signature(tokens: list[Token], i: int) -> str:
    while i < len(tokens) and tokens[i][1] == "(":
        i += 1  # "(SELECT ...) UNION (...)": the first branch names it
    if i >= len(tokens) or tokens[i][0] != "word":
        return ""
    keyword = tokens[i][1]
    if keyword == "WITH":
        return _signature(tokens, _after_ctes(tokens, i + 1))
    if keyword == "SELECT":
        return _select(tokens, i + 1)
    if keyword in ("INSERT", "REPLACE", "MERGE"):
        j = i + 1
        while j < len(tokens) and tokens[j][1] in _INSERT_MODIFIERS:
            j += 1
        if j >= len(tokens) or tokens[j][1] != "INTO":  # `INSERT COIN TO PLAY`
            return keyword
        table = _name(tokens, j + 1)
        return f"{keyword} INTO {table}" if table else keyword
    if keyword == "UPDATE":
        j = i + 1
        while j < len(tokens) and tokens[j][1] in ("ONLY", "LOW_PRIORITY", "IGNORE", "OR"):
            j += 1
        table = _name(tokens, j)
        return f"UPDATE {table}" if table else keyword
    if keyword == "DELETE":
        j = i + 1
        if j < len(tokens) and tokens[j][1] == "FROM":
            j += 1
        while j < len(tokens) and tokens[j][1] == "ONLY":
            j += 1
        table = _name(tokens, j)
        return f"DELETE FROM {table}" if table else keyword
    if keyword in ("CALL", "EXEC", "EXECUTE"):
        proc = _name(tokens, i + 1)
        return f"{keyword} {proc}" if proc else keyword
    return keyword  # DDL (CREATE, ALTER, DROP...), transaction control and the rest


def _after_ctes(tokens: list[Token], i: int) -> int:
    """Skip `[RECURSIVE] name [(cols)] AS [NOT] [MATERIALIZED] (...) [, ...]`."""
    if i < len(tokens) and tokens[i][1] == "RECURSIVE":
        i += 1
    while i < len(tokens):
        while i < len(tokens) and tokens[i][1] != "(":
            i += 1  # the name, column list opener, AS, MATERIALIZED
        if i < len(tokens) and tokens[i - 1][1] not in ("AS", "MATERIALIZED"):
            i = _closing(tokens, i)  # a column list: the body's parenthesis comes next
            continue
        i = _closing(tokens, i)
        if i < len(tokens) and tokens[i][1] == ",":
            i += 1
            continue
        return i
    return i


def _select(tokens: list[Token], i: int) -> str:
    depth = 0
    while i < len(tokens):
        token = tokens[i][1]
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif depth == 0 and token == "FROM" and tokens[i][0] == "word":
            table = _name(tokens, i + 1)  # None for a derived table: FROM (SELECT ...)
            return f"SELECT FROM {table}" if table else "SELECT"
        i += 1
    return "SELECT"


def span_context(
    statement: str,
    instance: str | None = None,
    host: str | None = None,
    port: Any = None,
    rows_affected: int | None = None,
) -> dict[str, Any]:
    """`context` of a SQL span: the statement (cut, never its parameters), the database
    instance, rows affected by DML, and where the database is (destination). Its service
    target (the subtype and instance) is what the encoder infers for an exit span, so the
    span does not carry a copy: two objects fewer to keep while it waits for the worker."""
    db: dict[str, Any] = {"type": "sql", "statement": statement[:STATEMENT_LENGTH]}
    if instance is not None and not isinstance(instance, str):
        instance = str(instance)
    if instance:
        db["instance"] = instance
    if rows_affected is not None and rows_affected >= 0:
        db["rows_affected"] = rows_affected
    context: dict[str, Any] = {"db": db}
    destination: dict[str, Any] = {}
    if host:
        destination["address"] = host
    if port is not None:  # as the driver or URL has it: the encoder gives it the schema's type
        destination["port"] = port
    if destination:
        context["destination"] = destination
    return context


_contexts = _Kept()  # what `shared_span_context` gave, by statement and place


def shared_span_context(
    statement: str, instance: str | None = None, host: str | None = None, port: Any = None,
) -> dict[str, Any]:
    """`span_context(...)` of a statement without rows affected, as a new dict whose parts
    (`db`, `destination`) are built once per statement and place and shared by
    the spans of its runs: fewer objects wait for the worker, so the cyclic collector runs
    less often on the app's threads. Nothing may change those parts (the encoders copy
    what they change); a span's own `context` dict is its own."""
    key = (statement, instance, host, port)
    kept = _contexts.items.get(key)
    if kept is None:
        kept = span_context(statement, instance, host, port)
        _contexts.put(key, kept, statement)
    return dict(kept)
