"""Sandbox backends by name, and `make_sandbox`, the one way environments start a sandbox.

    sb = make_sandbox("local", source="path/to/repo")      # kwargs of the backend's class

Built-in backends: ``local`` (kat_jax.envs.local_sandbox.LocalSandbox: an isolated process on this
machine) and ``docker`` (kat_jax.envs.docker_sandbox.DockerSandbox: a locked-down container; the
``docker`` package is imported only when one starts). Both are registered here, explicitly; the
backend modules import only the shared protocol and helpers (kat_jax.envs.sandbox), never this
module, so there is no cycle.

A new backend (e.g. a remote fleet) is a class that follows the ``Sandbox`` protocol of
kat_jax.envs.sandbox, registered once at start-up::

    register_sandbox_backend("fleet", FleetSandbox)
    env = make_env("swe", backend="fleet", sandbox_kwargs={...})
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kat_jax.envs.docker_sandbox import DockerSandbox
from kat_jax.envs.local_sandbox import LocalSandbox
from kat_jax.envs.sandbox import Sandbox

# backend name -> class (or factory) called with the sandbox kwargs.
SANDBOX_BACKENDS: dict[str, Callable[..., Sandbox]] = {
    "local": LocalSandbox,
    "docker": DockerSandbox,
}


def register_sandbox_backend(name: str, factory: Callable[..., Sandbox]) -> None:
    """Makes ``make_sandbox(name, **kwargs)`` call ``factory(**kwargs)``. A name is registered
    once (registering the same factory again is a no-op)."""
    if SANDBOX_BACKENDS.get(name, factory) is not factory:
        raise ValueError(f"sandbox backend {name!r} is already registered")
    SANDBOX_BACKENDS[name] = factory


def sandbox_backend_names() -> list[str]:
    """The registered backends in registration order (what --backend accepts)."""
    return list(SANDBOX_BACKENDS)


def make_sandbox(backend: str, **kwargs: Any) -> Sandbox:
    """Starts a sandbox of a registered backend: ``"local"`` (kwargs of LocalSandbox), ``"docker"``
    (DockerSandbox), or one added with register_sandbox_backend."""
    if backend not in SANDBOX_BACKENDS:
        raise ValueError(f"unknown sandbox backend {backend!r} "
                         f"({', '.join(sandbox_backend_names())})")
    return SANDBOX_BACKENDS[backend](**kwargs)
