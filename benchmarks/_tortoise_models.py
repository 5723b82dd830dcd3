"""Tortoise ORM's model of ``bench_items`` (imported only when Tortoise runs).

Tortoise discovers models by module, so this one holds the model alone. It is registered in
a ``TortoiseContext`` per backend (:mod:`benchmarks._peers`), never globally.
"""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model

__all__ = ["TortoiseItem"]


class TortoiseItem(Model):
    """The same five columns as :class:`benchmarks._schema.Item`."""

    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=50)
    email = fields.CharField(max_length=100)
    value = fields.IntField()
    counter = fields.IntField()

    class Meta:
        table = "bench_items"
