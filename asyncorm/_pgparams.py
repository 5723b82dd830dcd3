"""libpq's URL parameters for asyncpg: what hosted PostgreSQL URLs carry, checked and mapped.

The URLs hosted PostgreSQL services hand out are libpq URLs:
``postgresql://app:pw@db.example.com/app?sslmode=verify-full&sslrootcert=ca.pem``.
SQLAlchemy's asyncpg dialect passes every query parameter to ``asyncpg.connect()`` as a
keyword argument, which has no ``sslmode`` or ``application_name`` keyword. asyncpg itself
parses libpq's parameters from a DSN (the ``ssl*`` family, ``target_session_attrs``,
``krbsrvname``, ``gsslib``, ``passfile``) and sends any other one (``application_name``,
``options``) as a startup parameter, which is how libpq sends those two. This module:

* checks the URL's parameters when the engine is created: an unknown one is a
  :class:`~asyncorm.ConfigurationError` naming it and the accepted ones (asyncpg would
  send a misspelt ``sslmdoe=require`` to the server as a setting, and TLS would silently
  stay at ``prefer``);
* hands libpq's parameters to asyncpg's own DSN parser as the ``dsn`` argument, beside the
  host, port, user and database SQLAlchemy passes (:func:`connect_params` on each connect,
  so ``engine.url`` keeps the URL as written);
* maps ``connect_timeout`` to asyncpg's ``timeout`` and reads asyncpg's numeric keywords as
  numbers;
* accepts several hosts in libpq's forms: ``postgresql://u@a:5432,b:5433/db``,
  ``?host=a,b&port=5432,5433`` and ``?host=a:5432&host=b:5433`` (a host without a port
  gets the URL's port, or 5432).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from sqlalchemy.engine import URL

from ._errors import ConfigurationError

__all__ = ["ACCEPTED", "SSLMODES", "Translation", "split_netloc_hosts", "translate"]

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")

# parsed by asyncpg from the DSN (the last two sent to the server as startup parameters)
_LIBPQ = frozenset(
    {
        "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl",
        "sslnegotiation", "ssl_min_protocol_version", "ssl_max_protocol_version",
        "target_session_attrs", "krbsrvname", "gsslib", "passfile",
        "application_name", "options",
    }
)  # fmt: skip
# asyncpg keyword arguments SQLAlchemy's URLs have carried, and how to read them
_NUMBERS: dict[str, type[int] | type[float]] = {
    "command_timeout": float,
    "statement_cache_size": int,
    "max_cached_statement_lifetime": int,
    "max_cacheable_statement_size": int,
    "prepared_statement_cache_size": int,  # SQLAlchemy's own
}
_ROUTING = frozenset({"host", "port"})  # SQLAlchemy's multi-host handling
# asyncorm's own: read by the profile (asyncorm._pgbouncer), never sent to asyncpg
_ASYNCORM = frozenset({"pgbouncer"})
ACCEPTED = tuple(
    sorted(_LIBPQ | set(_NUMBERS) | _ROUTING | _ASYNCORM | {"connect_timeout", "ssl"})
)


class Translation:
    """What one engine's connects pass to asyncpg instead of the URL's query parameters."""

    __slots__ = ("drop", "dsn", "kwargs")

    def __init__(self, dsn: str | None, kwargs: dict[str, Any], drop: frozenset[str]) -> None:
        self.dsn = dsn
        self.kwargs = kwargs
        self.drop = drop

    def apply(self, cparams: dict[str, Any]) -> None:
        """Rewrite one connect's keyword arguments (a copy SQLAlchemy makes per connect)."""
        for key in self.drop:
            cparams.pop(key, None)
        cparams.update(self.kwargs)
        if self.dsn is not None:
            cparams["dsn"] = self.dsn


def translate(url: URL, shown: str, connect_args: Mapping[str, Any]) -> tuple[URL, Translation]:
    """Check ``url``'s query parameters, normalise its hosts, and plan the connect arguments;
    a keyword of ``connect_args`` wins over the URL parameter it replaces.

    Raises :class:`ConfigurationError` for an unknown parameter or an impossible value.
    """
    query = url.query
    unknown = sorted(set(query) - set(ACCEPTED))
    if unknown:
        raise ConfigurationError(
            f"Unknown parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(name) for name in unknown)} in the URL {shown!r}. "
            f"Accepted: {', '.join(ACCEPTED)}. Other server settings go in "
            f"options=-c name=value, or connect_args={{'server_settings': {{...}}}}."
        )
    values: dict[str, str] = {}
    for name, value in query.items():
        if name == "host":
            continue
        if not isinstance(value, str):
            raise ConfigurationError(
                f"The URL {shown!r} gives the parameter {name!r} {len(value)} times; give it once."
            )
        values[name] = value
    _check_choice(values, "sslmode", SSLMODES, shown)
    _check_choice(values, "ssl", SSLMODES, shown)
    _check_choice(values, "target_session_attrs", _SESSION_ATTRS, shown)
    kwargs: dict[str, Any] = {}
    for name, kind in _NUMBERS.items():
        if name in values:
            kwargs[name] = _number(values[name], kind, name, shown)
    if "connect_timeout" in values:
        # libpq: 0 or less waits forever (asyncpg: timeout=None)
        seconds = _number(values["connect_timeout"], float, "connect_timeout", shown)
        kwargs["timeout"] = seconds if seconds > 0 else None
    if "ssl" in values:
        kwargs["ssl"] = values["ssl"]
    libpq = {name: value for name, value in values.items() if name in _LIBPQ}
    dsn = f"postgresql://?{urlencode(libpq, quote_via=quote)}" if libpq else None
    for name in connect_args:  # connect_args={"timeout": 5} over ?connect_timeout=10
        kwargs.pop(name, None)
    if "dsn" in connect_args:
        dsn = None
    drop = frozenset(values) - _ROUTING - set(connect_args)
    return _normalise_hosts(url, shown), Translation(dsn, kwargs, drop)


def _check_choice(
    values: Mapping[str, str], name: str, choices: tuple[str, ...], shown: str
) -> None:
    if name in values and values[name] not in choices:
        raise ConfigurationError(
            f"{name}={values[name]!r} in the URL {shown!r} is not one of: {', '.join(choices)}."
        )


def _number(text: str, kind: type[int] | type[float], name: str, shown: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise ConfigurationError(
            f"{name}={text!r} in the URL {shown!r} must be a number"
            f"{' of seconds' if 'timeout' in name else ''}."
        ) from None


def _normalise_hosts(url: URL, shown: str) -> URL:
    """Several hosts as ``host=h:p`` repeated, each with its port, as SQLAlchemy wants them."""
    raw = url.query.get("host")
    if raw is None:
        return url
    if isinstance(raw, str):
        hosts = raw.split(",")
        port_text = url.query.get("port")
        ports = port_text.split(",") if isinstance(port_text, str) else []
        if len(hosts) == 1 or (ports and len(ports) not in (1, len(hosts))):
            return url  # one host, or SQLAlchemy's own error for mismatched lists
        if ports:
            pairs = [(host, ports[i if len(ports) > 1 else 0]) for i, host in enumerate(hosts)]
        else:
            pairs = [_host_port(token, url) for token in hosts]
    else:
        if "port" in url.query:
            return url  # SQLAlchemy refuses to mix the forms, with a clear message
        pairs = [_host_port(token, url) for token in raw]
    for host, port in pairs:
        if not host or not port.isdigit():
            raise ConfigurationError(
                f"The host list in the URL {shown!r} has an empty host or a port that is "
                f"not a number ({host!r}:{port!r}); write host1:port1,host2:port2."
            )
    return url.difference_update_query(["port"]).update_query_dict(
        {"host": [f"{host}:{port}" for host, port in pairs]}
    )


def _host_port(token: str, url: URL) -> tuple[str, str]:
    host, colon, port = token.rpartition(":")
    return (host, port) if colon else (token, str(url.port or 5432))


_NETLOC_HOSTS = re.compile(
    r"^(?P<scheme>postgres(?:ql)?(?:\+\w+)?://)(?P<netloc>[^/?#]*,[^/?#]*)(?P<rest>.*)$",
    re.IGNORECASE | re.DOTALL,
)


def split_netloc_hosts(text: str) -> str:
    """``postgresql://u@a:5432,b:5433/db`` as ``postgresql://u@/db?host=a:5432&host=b:5433``,
    the form SQLAlchemy parses; any other text unchanged."""
    match = _NETLOC_HOSTS.match(text)
    if match is None:
        return text
    auth, at, hostlist = match.group("netloc").rpartition("@")
    path, mark, query = match.group("rest").partition("?")
    hosts = "&".join(f"host={quote(host, safe=':')}" for host in hostlist.split(","))
    return f"{match.group('scheme')}{auth}{at}{path or '/'}?{hosts}{'&' + query if mark else ''}"
