"""Why a PostgreSQL connection could not be opened, as asyncorm errors.

asyncpg reports a failed connect with whatever failed: ``ssl.SSLCertVerificationError``,
``ConnectionRefusedError``, ``CannotConnectNowError`` ("the database system is starting
up"). Two of those become asyncorm errors naming the server and what to do:

* a certificate that fails ``verify-ca``/``verify-full``: :class:`TLSVerificationError`;
* a server that is not there right now (refused, reset, timed out, starting up or shutting
  down: a restart or a failover): :class:`DatabaseUnavailableError`.

A pgbouncer refusing a startup parameter (``statement_timeout``) is a
:class:`ConfigurationError` saying where to set it instead (:mod:`asyncorm._pgbouncer`).
Authentication, an unknown database and other configuration errors pass through unchanged.
"""

from __future__ import annotations

import ssl
from typing import Any

from ._errors import DatabaseUnavailableError, TLSVerificationError
from ._pgbouncer import startup_refused

__all__ = ["connect_error"]

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)
_UNAVAILABLE_STATES = {"57P03": "the server is starting up or shutting down"}
_UNAVAILABLE_OS = {
    ConnectionRefusedError: "connection refused",
    ConnectionResetError: "connection reset",
    ConnectionAbortedError: "connection aborted",
    TimeoutError: "no answer within the connect timeout",
}


def connect_error(exc: Exception, kwargs: dict[str, Any]) -> Exception | None:
    """The asyncorm error for ``exc``, raised by ``asyncpg.connect(**kwargs)``, or None."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _tls_failure(exc, _where(kwargs))
    refused = startup_refused(exc, _where(kwargs))
    if refused is not None:
        return refused
    import asyncpg  # here: only PostgreSQL engines get here

    reason = _UNAVAILABLE_STATES.get(str(getattr(exc, "sqlstate", "")))
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        reason = "the server closed the connection while it was being opened"
    if reason is None:
        reason = next(
            (text for kind, text in _UNAVAILABLE_OS.items() if isinstance(exc, kind)), None
        )
    if reason is None:
        return None
    return DatabaseUnavailableError(
        f"Cannot connect to the PostgreSQL server at {_where(kwargs)}: {reason} "
        f"({' '.join(str(exc).split()) or type(exc).__name__}). Is it running, and on that "
        f"host and port? During a restart or failover, run the work again once it answers."
    )


def _where(kwargs: dict[str, Any]) -> str:
    host, port = kwargs.get("host"), kwargs.get("port")
    if isinstance(host, list | tuple):
        return ", ".join(f"{h}:{p}" for h, p in zip(host, port or (), strict=False))
    return f"{host or 'localhost'}:{port or 5432}"


def _tls_failure(exc: ssl.SSLCertVerificationError, where: str) -> Exception:
    reason = str(exc.verify_message or exc.reason or exc).rstrip(".")
    if exc.verify_code in _NAME_MISMATCH:
        advice = (
            "With sslmode=verify-full the certificate must name the host of the URL: "
            "connect with a host name the certificate names, or use sslmode=verify-ca to "
            "check only that a trusted CA signed it"
        )
    else:
        advice = (
            "Point sslrootcert at the certificate of the CA that signed the server's "
            "certificate (your provider publishes it)"
        )
    error = TLSVerificationError(
        f"The TLS certificate of the PostgreSQL server at {where} failed verification: "
        f"{reason}. {advice}."
    )
    error.verify_code, error.verify_message = exc.verify_code, exc.verify_message
    return error
