"""The active transaction or span of the running code, kept in one ContextVar.

Each thread starts with nothing active; an asyncio task inherits what was active where it
was created. A span points at its transaction, so one lookup answers both questions.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from beatlib.tracing import Span, Transaction

    Segment: TypeAlias = Transaction | Span

active: ContextVar[Segment | None] = ContextVar("beatlib_active", default=None)

get_active = active.get
set_active = active.set


def current_transaction() -> Transaction | None:
    """The transaction the running code belongs to, if one is open."""
    segment = active.get()
    if segment is None:
        return None
    transaction = segment.transaction
    return None if transaction.ended else transaction


def current_span() -> Span | None:
    """The innermost open span of the running code, if any."""
    segment = active.get()
    if segment is None or segment is segment.transaction or segment.transaction.ended:
        return None
    return segment  # type: ignore[return-value]
