"""Execution option names shared by the session layer and the engine profiles."""

from __future__ import annotations

__all__ = ["READ_ONLY", "read_only_options"]

READ_ONLY = "asyncorm_read_only"
"""The session (or connection) is read-only: on SQLite the profile refuses a write before
sending it; PostgreSQL gets ``postgresql_readonly`` (``BEGIN READ ONLY``) alongside."""


def read_only_options() -> dict[str, bool]:
    """The execution options that make a session's connections read-only, on any backend."""
    return {READ_ONLY: True, "postgresql_readonly": True}
