"""Keep imports the server never uses off its start-up path (``bench/coldstart_bench.py``).

**openenv's MCP runtime** (fastmcp and the mcp SDK, about 1.1 s of imports here).
openenv-core 0.3's HTTP server imports ``openenv.core.env_server.mcp_environment`` eagerly,
which imports fastmcp and the mcp SDK. tracefix_rl serves its MCP tools itself
(``server.mcp``, plain JSON-RPC), so the server never calls into that runtime.

``defer_mcp_runtime()`` puts a small stand-in module in its place until something really needs it:

* ``get_server_tools`` (the one name openenv's HTTP server imports) loads the real module on
  first call and delegates to it;
* the package ``openenv.core.env_server`` is told MCPEnvironment is not installed, which it
  already tolerates (its export becomes ``None`` in this process);
* any other name, from anyone else, loads and returns the real thing.

Install it before anything imports ``openenv``; afterwards it has no effect.

**pydantic.v1** (about 0.4 s). While routes are built, FastAPI asks of every parameter
whether it is a pydantic v1 model, importing ``pydantic.v1`` to find out. In a process that
has never imported ``pydantic.v1`` no v1 model can exist, so ``no_pydantic_v1()`` declines
that import for the duration (FastAPI reads the ImportError as "no"); afterwards it imports
normally on first real use.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from typing import Any

MCP_MODULE = "openenv.core.env_server.mcp_environment"
PYDANTIC_V1 = "pydantic.v1"
_PACKAGE = MCP_MODULE.rsplit(".", 1)[0]


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the first import of the MCP module with a stand-in; later ones go through."""

    def __init__(self) -> None:
        self.active = True

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname != MCP_MODULE or not self.active:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _stand_in(self)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _stand_in(finder: _StandInFinder) -> types.ModuleType:
    module = types.ModuleType(MCP_MODULE, "Stand-in; the real module loads on first use.")

    def load_real() -> types.ModuleType:
        finder.active = False
        if sys.modules.get(MCP_MODULE) is module:
            del sys.modules[MCP_MODULE]
        return importlib.import_module(MCP_MODULE)

    def get_server_tools(mcp_server: Any) -> dict[str, Any]:
        return load_real().get_server_tools(mcp_server)

    def module_getattr(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        caller = sys._getframe(1).f_globals.get("__name__")
        if name == "MCPEnvironment" and caller == _PACKAGE:
            raise ModuleNotFoundError("MCP runtime deferred by tracefix_rl", name="fastmcp")
        return getattr(load_real(), name)

    module.get_server_tools = get_server_tools
    module.__getattr__ = module_getattr
    return module


def defer_mcp_runtime() -> None:
    """Defer the MCP runtime for this process (idempotent; a no-op once openenv is loaded)."""
    if MCP_MODULE in sys.modules or any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _StandInFinder())


class _DeclinePydanticV1(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname == PYDANTIC_V1:
            raise ModuleNotFoundError("pydantic.v1 declined while routes are built", name=fullname)
        return None


@contextlib.contextmanager
def no_pydantic_v1() -> Iterator[None]:
    """Within the block, ``import pydantic.v1`` fails unless it is already imported."""
    if PYDANTIC_V1 in sys.modules:
        yield
        return
    finder = _DeclinePydanticV1()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
