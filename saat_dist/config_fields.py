"""What the run config's sections are built from, wherever a section is
declared (saat_dist.config, the defence, attack, model and optimizer files).

A section is a pydantic v2 dataclass (``@section``) that refuses unknown
keys; each field is ``name: Annotated[type, Field(description=..., ge=...)] =
default``, so a plain ``dataclasses.dataclass`` may still extend it and
``dataclasses.fields/replace/asdict`` keep working. Budgets in pixel units
(``Budget``, ``StepSize``) also take ``N/255`` strings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, dataclass_transform

import pydantic.dataclasses
from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema

T = TypeVar("T")

# Not strict: a nested section arrives as a mapping, and "1e-4" (a string to YAML 1.1) is a number here
SECTION_CONFIG = ConfigDict(extra="forbid")

FRACTION_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*/\s*[0-9]+(\.[0-9]+)?\s*$"
_FRACTION = re.compile(FRACTION_PATTERN)


@dataclass_transform(field_specifiers=(dataclasses.field, Field))
def section(cls: type[T]) -> type[T]:
    """A config section: a pydantic dataclass that validates on construction and refuses unknown keys."""
    return pydantic.dataclasses.dataclass(cls, config=SECTION_CONFIG)  # type: ignore[return-value]


def field(*, default_factory: Callable[[], Any], description: str | None = None) -> Any:
    """A field whose default is built per instance (a section, a list). A
    section's description defaults to its class docstring, so a section added
    as ``name: Cls = field(default_factory=Cls)`` is documented too."""
    doc = description
    if doc is None and dataclasses.is_dataclass(default_factory):
        doc = " ".join((default_factory.__doc__ or "").split())
        if doc.startswith(f"{default_factory.__name__}("):  # dataclasses' stand-in: the signature, no docstring
            doc = ""
    return dataclasses.field(default_factory=default_factory, metadata={"description": doc} if doc else {})


def parse_fraction(value: Any) -> Any:
    """``"16/255"`` -> 16 / 255; anything else is left to the number check."""
    if not isinstance(value, str):
        return value
    if "/" not in value:
        try:
            return float(value)  # "1e-4": a string to YAML 1.1
        except ValueError:
            raise ValueError(f"expected a number or a fraction such as 16/255, got {value!r}") from None
    if not _FRACTION.match(value):
        raise ValueError(f"expected a number or a fraction such as 16/255, got {value!r}")
    numerator, denominator = (float(part) for part in value.split("/"))
    if denominator == 0:
        raise ValueError(f"{value!r} divides by zero")
    return numerator / denominator


def _budget_schema(minimum: str, maximum: str) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"type": "number", minimum: 0, maximum: 1},
                                     {"type": "string", "pattern": FRACTION_PATTERN}]})


# An L-inf budget in [0, 1] pixel units: a number or "N/255"
Budget = Annotated[float, Field(ge=0, le=1), BeforeValidator(parse_fraction),
                   _budget_schema("minimum", "maximum")]
# A PGD step in (0, 1] pixel units: a number or "N/255"
StepSize = Annotated[float, Field(gt=0, le=1), BeforeValidator(parse_fraction),
                     _budget_schema("exclusiveMinimum", "maximum")]
