"""Configuration dataclasses with one line of documentation per field (as pex_config's ``doc=``).

Every stage's settings are a small frozen dataclass made with :func:`configclass`, each
field declared with :func:`option`, which stores its documentation in the field's metadata.
The class docstring then lists every field with its default and its line, so
``help(SubtractConfig)`` documents them all, and :func:`field_docs` returns them for
tables and tests.
"""

from __future__ import annotations

import dataclasses
import inspect

__all__ = ["option", "configclass", "field_docs"]


def option(default=dataclasses.MISSING, doc: str = "", *, factory=dataclasses.MISSING):
    """A dataclass field with its one-line documentation ``doc``; ``factory`` for mutable
    or nested defaults (another config)."""
    if not doc or "\n" in doc:
        raise ValueError("every option needs a one-line doc")
    return dataclasses.field(default=default, default_factory=factory, metadata={"doc": doc})


def field_docs(cls) -> dict:
    """``{name: doc}`` for every field of a config class (or instance)."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def configclass(cls):
    """Make ``cls`` a frozen dataclass whose docstring ends with a numpydoc ``Attributes``
    section built from its fields' docs."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif isinstance(f.default_factory, type):
            default = f"{f.default_factory.__name__}()"
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines += [f"{f.name} : {kind}, default {default}", f"    {f.metadata.get('doc', '')}"]
    cls.__doc__ = inspect.cleandoc(cls.__doc__ or cls.__name__) + "\n\nAttributes\n----------\n" + \
        "\n".join(lines) + "\n"
    return cls
