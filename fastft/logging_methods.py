"""The logging calls Dynamo skips while it traces an optimised forward
(``torch._dynamo.config.ignore_logging_functions``), as the entry points pass them."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

_LOGGING_NAMES = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "log"})


class NamedFunction(str):
    """A function as an element of Dynamo's ignore set: hashed as and equal to the function
    (Dynamo asks ``method.__func__ in ignore_set``), and otherwise the string of its qualified
    name. torch 2.11's compile-metrics logger sorts every set in Dynamo's config and encodes it
    as JSON: a set of plain functions made it log a TypeError traceback on every compile, and
    drop that compile's metrics. What no longer matches is Dynamo's other test, identity with a
    function met as a value (``logging.Logger.warning(logger, msg)``); model code calls these
    methods on a logger, which the membership test covers."""

    fn: Callable[..., Any]

    def __new__(cls, fn: Callable[..., Any]) -> "NamedFunction":
        self = super().__new__(cls, f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}")
        self.fn = fn
        return self

    def __hash__(self) -> int:
        return hash(self.fn)

    def __eq__(self, other: object) -> bool:
        return other is self.fn or (isinstance(other, NamedFunction) and other.fn is self.fn)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    # Dynamo deep-copies its config to report it, and may pickle it: both keep the function.
    def __deepcopy__(self, memo: dict) -> "NamedFunction":
        return self

    def __reduce__(self) -> tuple:
        return NamedFunction, (self.fn,)


def logging_methods() -> set[NamedFunction]:
    """The methods of ``logging.Logger`` (also those libraries add, such as a ``warning_once``)
    that Dynamo may skip while tracing a forward. A warning inside a forward would otherwise
    break the graph there, often right between the output projection and the loss. Inside the
    optimised forward these calls do not run, so their messages are not printed."""
    methods = tuple(method for name, method in vars(logging.Logger).items()
                    if callable(method) and (name in _LOGGING_NAMES or name.endswith(("_once", "_advice"))))
    return set(_named(methods))


@functools.lru_cache(maxsize=8)
def _named(methods: tuple) -> frozenset[NamedFunction]:
    # Every optimised forward call asks (a library may add a method at any time); the wrappers
    # are made once per set of methods.
    return frozenset(NamedFunction(m) for m in methods)
