"""TLS for real: a throwaway cluster with ssl=on and a CA made by the test (tests/pgcluster.py).

The clever paths (deferred BEGIN, pre-ping, cancellation) run over TLS as they do without it.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncorm
from tests.conftest import capture_sql, reset_schema
from tests.models import User
from tests.pgcluster import TLS_ONLY_USER, Cluster


async def _ssl_in_use(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        return bool(
            await conn.scalar(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
        )


async def test_sslmode_require_encrypts_and_the_clever_paths_still_work(
    pg_cluster: Cluster,
) -> None:
    engine = asyncorm.create_engine(
        pg_cluster.url(user=TLS_ONLY_USER, query="sslmode=require&application_name=tls-test"),
        pool_pre_ping_after=0,
    )
    admin = asyncorm.create_engine(pg_cluster.url(query="sslmode=disable"))
    Session = asyncorm.async_sessionmaker(engine)
    try:
        assert await _ssl_in_use(engine)
        await reset_schema(engine)
        # deferred BEGIN: a read alone sends no BEGIN, a write after it is one transaction
        async with Session() as session:
            with capture_sql(engine) as sql:
                assert await session.scalar(select(func.count()).select_from(User)) == 0
            assert not any(s.upper().startswith("BEGIN") for s in sql)
            session.add(User(name="ann"))
            await session.commit()
        # pre-ping: a pooled TLS connection whose backend was ended is replaced at checkout
        async with admin.connect() as conn:
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'tls-test'"
                )
            )
        async with Session() as session:
            assert await session.scalar(select(User.name)) == "ann"
        # cancellation: a statement blocked on a lock, cancelled by a timeout, is cancelled on
        # the server over TLS, and the connection serves the next session
        async with admin.connect() as holder:
            await holder.execute(text("SELECT pg_advisory_lock(14)"))
            async with Session() as session:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await session.execute(text("SELECT pg_advisory_lock(14)"))
            await holder.execute(text("SELECT pg_advisory_unlock(14)"))
        async with Session() as session:
            assert await session.scalar(select(func.count()).select_from(User)) == 1
            assert not await session.scalar(
                text("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE objid = 14)")
            )
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
        await admin.dispose()


async def test_without_tls_the_tls_only_role_is_refused(pg_cluster: Cluster) -> None:
    """The server really tells the modes apart: the role is refused without encryption."""
    engine = asyncorm.create_engine(pg_cluster.url(user=TLS_ONLY_USER, query="sslmode=disable"))
    try:
        with pytest.raises(Exception, match=r"pg_hba.conf rejects connection .* no encryption"):
            await _ssl_in_use(engine)
    finally:
        await engine.dispose()


async def test_verify_full_connects_to_the_name_in_the_certificate(pg_cluster: Cluster) -> None:
    engine = asyncorm.create_engine(
        pg_cluster.url(host="localhost", query=f"sslmode=verify-full&sslrootcert={pg_cluster.ca}")
    )
    try:
        assert await _ssl_in_use(engine)
    finally:
        await engine.dispose()


async def test_verify_full_against_another_host_name_is_a_clear_error(
    pg_cluster: Cluster,
) -> None:
    """The certificate names ``localhost``; the URL says 127.0.0.1, the same server."""
    engine = asyncorm.create_engine(
        pg_cluster.url(query=f"sslmode=verify-full&sslrootcert={pg_cluster.ca}")
    )
    try:
        with pytest.raises(asyncorm.TLSVerificationError) as info:
            await _ssl_in_use(engine)
    finally:
        await engine.dispose()
    assert str(info.value) == (
        f"The TLS certificate of the PostgreSQL server at 127.0.0.1:{pg_cluster.port} failed "
        f"verification: IP address mismatch, certificate is not valid for '127.0.0.1'. With "
        f"sslmode=verify-full the certificate must name the host of the URL: connect with a "
        f"host name the certificate names, or use sslmode=verify-ca to check only that a "
        f"trusted CA signed it."
    )
    assert isinstance(info.value, ssl.SSLCertVerificationError)


async def test_verify_ca_passes_for_another_host_name_but_not_for_another_ca(
    pg_cluster: Cluster,
) -> None:
    ok = asyncorm.create_engine(
        pg_cluster.url(query=f"sslmode=verify-ca&sslrootcert={pg_cluster.ca}")
    )
    wrong_ca = asyncorm.create_engine(
        pg_cluster.url(query=f"sslmode=verify-ca&sslrootcert={pg_cluster.dir / 'server.crt'}")
    )
    try:
        assert await _ssl_in_use(ok)
        with pytest.raises(
            asyncorm.TLSVerificationError,
            match=r"failed verification: .*issuer.* Point sslrootcert at the certificate of "
            r"the CA that signed",
        ):
            await _ssl_in_use(wrong_ca)
    finally:
        await ok.dispose()
        await wrong_ca.dispose()
