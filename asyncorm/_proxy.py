"""The registry's proxies, generated from :class:`AsyncSession`'s public members.

Each public member of the session class becomes a member of the registry acting on ``db()``,
the current task's session: methods call it, properties read and write it, class and static
methods go to the factory's session class.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from ._session import AsyncSession

__all__ = ["install_session_proxies", "session_api"]

_markcoroutinefunction = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+

_PROTOCOL_DUNDERS = ("__contains__", "__iter__")
"""AsyncSession's dunder methods that are part of its public API (``obj in s``, ``iter(s)``)."""


def session_api(session_cls: type[Any] = AsyncSession) -> dict[str, Any]:
    """The public members of ``session_cls``: name -> the attribute as defined on the class.

    Public names of ``dir()``, the protocol dunders, and public annotated instance
    attributes (``sync_session``), the latter mapped to ``None``.
    """
    members: dict[str, Any] = {}
    for klass in reversed(session_cls.__mro__):
        for name in vars(klass).get("__annotations__", {}):
            if not name.startswith("_"):
                members[name] = None
    for name in dir(session_cls):
        if not name.startswith("_") or name in _PROTOCOL_DUNDERS:
            members[name] = inspect.getattr_static(session_cls, name)
    return members


def _proxy(name: str, attr: Any) -> Any:
    """A class attribute of the registry acting on ``db()``'s member ``name``."""
    if isinstance(attr, classmethod | staticmethod):
        func = attr.__func__

        def proxy_cls(self: Any, *args: Any, **kwargs: Any) -> Any:
            return getattr(getattr(self.session_factory, "class_", AsyncSession), name)(
                *args, **kwargs
            )

        return _named(proxy_cls, name, func, "the session class's")
    if inspect.isfunction(attr):
        # A plain function even for coroutine methods: the session is looked up where the
        # call is written, so `asyncio.wait_for(db.execute(q), 5)` or
        # `create_task(db.flush())` act on the caller's session, not on the session of the
        # task that ends up running the coroutine.
        def proxy(self: Any, *args: Any, **kwargs: Any) -> Any:
            return getattr(self(), name)(*args, **kwargs)

        if inspect.iscoroutinefunction(attr) and _markcoroutinefunction is not None:
            _markcoroutinefunction(proxy)
        return _named(proxy, name, attr)

    def fget(self: Any) -> Any:
        return getattr(self(), name)

    def fset(self: Any, value: Any) -> None:
        setattr(self(), name, value)

    if isinstance(attr, property):
        doc = f"Proxy for the current session's ``{name}``.\n\n{attr.__doc__ or ''}"
        return property(fget, fset if attr.fset is not None else None, doc=doc)
    return property(fget, fset, doc=f"Proxy for the current session's ``{name}``.")


def _named(proxy: Any, name: str, wrapped: Any, of: str = "the current session's") -> Any:
    functools.update_wrapper(proxy, wrapped)
    proxy.__qualname__ = f"async_scoped_session.{name}"
    proxy.__module__ = "asyncorm._registry"
    proxy.__doc__ = f"Proxy for {of} ``{name}()``.\n\n{wrapped.__doc__ or ''}"
    return proxy


def install_session_proxies(cls: type[Any]) -> None:
    """Give ``cls`` (the registry) a proxy for every public AsyncSession member."""
    for name, attr in session_api().items():
        if name in vars(cls):
            raise TypeError(f"async_scoped_session.{name} would shadow AsyncSession.{name}")
        setattr(cls, name, _proxy(name, attr))
