"""libpq URL parameters on PostgreSQL: checked when the engine is created, mapped for asyncpg."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

import asyncorm
from tests.conftest import postgres_url


async def _settings(url: str, **kwargs: Any) -> dict[str, str]:
    engine = asyncorm.create_engine(url, **kwargs)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT name, setting FROM pg_settings WHERE name IN "
                    "('application_name', 'statement_timeout', 'lock_timeout')"
                )
            )
            found = {name: setting for name, setting in rows}
            ssl = await conn.scalar(
                text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            )
            found["ssl"] = str(ssl)
            return found
    finally:
        await engine.dispose()


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


async def test_libpq_parameters_reach_the_server() -> None:
    """What every hosted PostgreSQL URL carries: sslmode, application_name, options,
    connect_timeout. Without the mapping asyncpg.connect() refuses sslmode outright."""
    url = _with_query(
        postgres_url(),
        "sslmode=disable&application_name=billing&connect_timeout=10"
        "&options=-c%20statement_timeout%3D5s%20-c%20lock_timeout%3D2s",
    )
    settings = await _settings(url)
    assert settings == {
        "application_name": "billing",
        "statement_timeout": "5000",
        "lock_timeout": "2000",
        "ssl": "False",
    }


async def test_statement_and_lock_timeout_engine_options() -> None:
    settings = await _settings(postgres_url(), statement_timeout=1.5, lock_timeout="3s")
    assert (settings["statement_timeout"], settings["lock_timeout"]) == ("1500", "3000")


async def test_statement_timeout_cancels_a_long_statement() -> None:
    engine = asyncorm.create_engine(postgres_url(), statement_timeout=0.05)
    try:
        async with engine.connect() as conn:
            with pytest.raises(Exception, match="canceling statement due to statement timeout"):
                await conn.execute(text("SELECT pg_sleep(10)"))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("value", [-1, True, "", [5]])
def test_bad_statement_timeout_is_a_configuration_error(value: object) -> None:
    with pytest.raises(asyncorm.ConfigurationError, match=r"statement_timeout must be a number"):
        asyncorm.create_engine("postgresql://u@h/db", statement_timeout=value)


def _hosts(url: str) -> list[str]:
    engine = asyncorm.create_engine(url)
    host = engine.url.query.get("host")
    return list(host) if isinstance(host, tuple) else [str(host)]


def test_several_hosts_in_every_libpq_form() -> None:
    assert _hosts("postgresql://u@a:5432,b:5433/db") == ["a:5432", "b:5433"]
    assert _hosts("postgresql://u:pw@a,b:6000/db?sslmode=require") == ["a:5432", "b:6000"]
    assert _hosts("postgresql://u@/db?host=a,b&port=5432,5433") == ["a:5432", "b:5433"]
    assert _hosts("postgresql://u@/db?host=a,b&port=6000") == ["a:6000", "b:6000"]
    assert _hosts("postgresql://u@/db?host=a,b") == ["a:5432", "b:5432"]
    assert _hosts("postgresql://u@/db?host=a:1&host=b") == ["a:1", "b:5432"]
    engine = asyncorm.create_engine("postgresql://u:pw@a:5432,b:5433/db?application_name=x")
    assert engine.url.database == "db"
    assert engine.url.password == "pw"
    assert engine.url.query["application_name"] == "x"


async def test_several_hosts_connect_to_the_first_that_answers() -> None:
    """The first host refuses (nothing listens on port 1); the second is the test server."""
    real = make_url(postgres_url())
    url = real.set(host=None, port=None).update_query_dict(
        {"host": f"127.0.0.1:1,{real.host}:{real.port or 5432}"}
    )
    settings = await _settings(
        _with_query(url.render_as_string(False), "target_session_attrs=read-write")
    )
    assert settings["ssl"] in ("True", "False")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sslmdoe=require", r"Unknown parameter 'sslmdoe' in the URL .*Accepted: .*sslmode"),
        ("foo=1&bar=2", r"Unknown parameters 'bar', 'foo'"),
        ("sslmode=on", r"sslmode='on' .* is not one of: disable, allow, prefer, require"),
        ("target_session_attrs=master", r"target_session_attrs='master'"),
        ("connect_timeout=soon", r"connect_timeout='soon' .* must be a number of seconds"),
        ("sslmode=require&sslmode=disable", r"gives the parameter 'sslmode' 2 times"),
        ("sslpassword=s3cret-pw", r"Unknown parameter 'sslpassword'"),
        ("host=a,b&port=x", r"port that is not a number"),
    ],
)
def test_bad_url_parameters_are_configuration_errors(query: str, message: str) -> None:
    with pytest.raises(asyncorm.ConfigurationError, match=message) as info:
        asyncorm.create_engine(f"postgresql://app:s3cret-pw@db/app?{query}")
    assert "s3cret-pw" not in str(info.value)


async def test_connect_args_win_over_the_url() -> None:
    url = _with_query(postgres_url(), "application_name=from-url&connect_timeout=5")
    settings = await _settings(
        url, connect_args={"server_settings": {"application_name": "from-args"}, "timeout": 9}
    )
    # asyncpg: explicit server_settings win over those parsed from the DSN
    assert settings["application_name"] == "from-args"
