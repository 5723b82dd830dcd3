"""The tables every contender reads and writes: same schema, same data."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["ITEM_COLUMNS", "Account", "Base", "BulkItem", "Item", "item_row"]


class Base(DeclarativeBase):
    pass


class Item(Base):
    """The rows W1 and W2 get by primary key and W4 loads in full."""

    __tablename__ = "bench_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str] = mapped_column(String(100))
    value: Mapped[int]
    counter: Mapped[int]


class BulkItem(Base):
    """W3 inserts into this table; it is emptied before every repeat."""

    __tablename__ = "bench_bulk"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    value: Mapped[int]
    note: Mapped[str | None] = mapped_column(String(100))


class Account(Base):
    """W6 moves money between these; the sum of balances must never change."""

    __tablename__ = "bench_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]


ITEM_COLUMNS = "id, name, email, value, counter"
"""The columns of ``bench_items`` in the order raw SQL selects them."""


def item_row(i: int) -> dict[str, object]:
    """The deterministic content of item ``i`` (1-based)."""
    return {
        "id": i,
        "name": f"item {i}",
        "email": f"item{i}@example.com",
        "value": i * 7 % 1000,
        "counter": 0,
    }
