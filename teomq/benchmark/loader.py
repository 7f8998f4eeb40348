"""Find the Driver a ``--driver`` spec names, in the harness and in every client process.

Specs: ``teomq`` (the default), ``nats``, ``redis``, ``rabbitmq`` (bench/peers/ of the
repository, run from its root), ``package.module:ClassName``, ``package.module`` (its one
Driver subclass), ``path/to/file.py[:ClassName]``. Module specs are imported with the current
directory and its ``bench/`` folder on ``sys.path`` (the repository's peer drivers are
``peers.<name>`` there); a file's own folder and the one above it are added too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from types import ModuleType

from teomq.benchmark.driver import Driver

BUILTIN = {
    "teomq": "teomq.benchmark.teomq_driver:TeomqDriver",
    # the repository's peer drivers (bench/peers/): found only with its bench/ folder at hand
    "nats": "peers.nats_driver:NatsDriver",
    "redis": "peers.redis_driver:RedisDriver",
    "rabbitmq": "peers.rabbitmq_driver:RabbitDriver",
}


def resolve(spec: str) -> tuple[str, list[str]]:
    """(absolute spec, sys.path entries it needs): computed once, in the harness."""
    spec = BUILTIN.get(spec or "teomq", spec)
    cwd = os.getcwd()
    paths = [cwd]
    if os.path.isdir(os.path.join(cwd, "bench")):
        paths.append(os.path.join(cwd, "bench"))
    target, cls = split_spec(spec)
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ValueError(f"driver file {target!r} not found")
        here = os.path.dirname(path)
        paths += [here, os.path.dirname(here)]
        spec = path + (f":{cls}" if cls else "")
    return spec, list(dict.fromkeys(paths))


def split_spec(spec: str) -> tuple[str, str]:
    """("module or file", "ClassName" or "")."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail.isidentifier():
        return head, tail
    return spec, ""


def load_driver(spec: str, options: dict[str, str] | None = None, paths: list[str] | None = None) -> Driver:
    """Import the driver class of a resolved spec and instantiate it with ``options``."""
    for p in reversed(paths or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    target, cls_name = split_spec(spec)
    module = _import_file(target) if target.endswith(".py") else importlib.import_module(target)
    if cls_name:
        cls = getattr(module, cls_name, None)
        if cls is None:
            raise ValueError(f"driver {spec!r}: {module.__name__} has no {cls_name}")
    else:
        found = [c for _, c in inspect.getmembers(module, inspect.isclass)
                 if issubclass(c, Driver) and c is not Driver and c.__module__ == module.__name__
                 and not inspect.isabstract(c)]
        if len(found) != 1:
            names = ", ".join(c.__name__ for c in found) or "none"
            raise ValueError(f"driver {spec!r}: expected one Driver subclass in {module.__name__}, found {names}; "
                             "name it as module:ClassName")
        cls = found[0]
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise ValueError(f"driver {spec!r}: {cls!r} is not a teomq.benchmark.driver.Driver")
    return cls(options)


def _import_file(path: str) -> ModuleType:
    name = "teomq_bench_driver_" + os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load driver file {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
