"""The position methods, by name. Adding one: a module here defining its ``PositionMethod``, and
its entry below; the server's settings, the editors' schema, the evaluation and the CLI follow."""

from .base import PositionMethod, RotaryBase
from .hirope import HIROPE, HIROPE_FIXED
from .ntk import DYNAMIC_NTK, NTK
from .plain import ROPE
from .rerope import REROPE
from .self_extend import SELF_EXTEND
from .yarn import YARN

REGISTRY: dict[str, PositionMethod] = {
    m.name: m for m in (HIROPE, HIROPE_FIXED, ROPE, NTK, DYNAMIC_NTK, YARN, REROPE, SELF_EXTEND)
}


def position_method(name: str) -> PositionMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown position method {name!r}; choose one of {', '.join(REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


__all__ = ["PositionMethod", "RotaryBase", "REGISTRY", "position_method", "method_names"]
