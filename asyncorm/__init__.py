"""asyncorm: the asyncio session layer for SQLAlchemy's ORM.

Example::

    import asyncorm

    engine = asyncorm.create_engine("sqlite:///app.db")
    Session = asyncorm.async_sessionmaker(engine)

    async with Session.begin() as session:
        session.add(User(name="ann"))
"""

from sqlalchemy.ext.asyncio import AsyncAttrs

from ._engine import create_engine, redact_url
from ._errors import (
    AsyncORMError,
    ConcurrentSessionUseError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseUnavailableError,
    EventLoopMismatchError,
    LazyLoadError,
    NoSessionScopeError,
    OnCommitError,
    PoolTimeoutError,
    ReadOnlySessionError,
    ScopeError,
    SQLiteWriteLockError,
    SQLiteWriteLockTimeout,
    TLSVerificationError,
    TransactionalUnitError,
    TransactionOutcomeUnknownError,
    UncommittedTaskWorkError,
    WriteConflictError,
)
from ._query import AsyncQuery, AwaitableExists
from ._registry import async_scoped_session
from ._retry import Backoff, is_retryable
from ._session import AsyncSession, async_sessionmaker
from ._transaction import transactional

__version__ = "0.1.0"

__all__ = [
    "AsyncAttrs",
    "AsyncORMError",
    "AsyncQuery",
    "AsyncSession",
    "AwaitableExists",
    "Backoff",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "ConnectionLostError",
    "DatabaseUnavailableError",
    "EventLoopMismatchError",
    "LazyLoadError",
    "NoSessionScopeError",
    "OnCommitError",
    "PoolTimeoutError",
    "ReadOnlySessionError",
    "SQLiteWriteLockError",
    "SQLiteWriteLockTimeout",
    "ScopeError",
    "TLSVerificationError",
    "TransactionOutcomeUnknownError",
    "TransactionalUnitError",
    "UncommittedTaskWorkError",
    "WriteConflictError",
    "async_scoped_session",
    "async_sessionmaker",
    "create_engine",
    "is_retryable",
    "redact_url",
    "transactional",
]
