"""The SDK's two faces: ``Client`` (blocking) and ``AsyncClient`` (trio) take the same explicit,
typed keyword arguments and offer the same methods."""

from __future__ import annotations

import inspect

from client import AsyncClient, Client


def public_methods(cls: type) -> set[str]:
    return {name for name, value in vars(cls).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, property))}


def test_same_arguments() -> None:
    a = inspect.signature(AsyncClient.__init__).parameters
    s = inspect.signature(Client.__init__).parameters
    assert list(a) == list(s)
    for name, param in a.items():
        assert param.kind != inspect.Parameter.VAR_KEYWORD, name
        assert param.default == s[name].default, name
        assert param.annotation == s[name].annotation, name
        if name not in ("self", "bootstrap", "deployment"):
            assert param.kind == inspect.Parameter.KEYWORD_ONLY, name
            assert param.annotation != inspect.Parameter.empty, name


def test_same_methods() -> None:
    assert public_methods(Client) - {"close"} == public_methods(AsyncClient)
    # stream() returns an async iterator to use in 'async with' (its sync twin a plain one)
    for name in public_methods(AsyncClient) - {"manifest", "stream"}:
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
        assert not inspect.iscoroutinefunction(getattr(Client, name)), name
