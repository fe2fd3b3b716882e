"""Keyset pagination, newest first: a page ends at (created_at, id) and the next starts strictly below it.

Keyset (not offset) so that pages stay correct while rows are inserted and cost one index range scan however
deep a client pages. The cursor is opaque to clients: base64 of the last row's key.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from store.models import is_public_id

T = TypeVar("T")


class InvalidCursor(ValueError):
    """The cursor was not produced by this service (or was altered)."""


@dataclass(frozen=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_cursor: str | None


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, row_id = json.loads(raw)
        created_at = datetime.fromisoformat(stamp)
        if not isinstance(row_id, str) or not is_public_id(row_id) or created_at.tzinfo is None:
            raise ValueError
    except (ValueError, TypeError, json.JSONDecodeError):
        raise InvalidCursor("cursor is not valid; pass next_cursor from a previous page") from None
    return created_at, row_id


def newest_first_page(
    session: Any,
    query: Select[Any],
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[str],
    *,
    limit: int,
    cursor: str | None,
) -> Page[Any]:
    """Run `query` for one page of at most `limit` rows, newest first, continuing after `cursor`."""
    if cursor:
        stamp, last_id = decode_cursor(cursor)
        query = query.where(or_(created_at < stamp, and_(created_at == stamp, row_id < last_id)))
    rows = list(session.scalars(query.order_by(created_at.desc(), row_id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return Page(rows, None)
    rows = rows[:limit]
    last = rows[-1]
    return Page(rows, encode_cursor(getattr(last, created_at.key), getattr(last, row_id.key)))
