"""The platform's numeric limits, once, as pydantic `Annotated` types.

The library's ranges live here; an edge that must be narrower (the HTTP generate routes allow fewer steps and
images per call than the library) narrows these types where it uses them, so both ranges are written once and
the narrowing is visible. Integer limits that end up in database columns are bounded by those columns
(`BigInt`, `Int32`): a value past them is bad input, not a server fault.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from causalt2i.errors import FieldError

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

# Sampling (causalt2i.generation).
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_IMAGES = 16
SIZE_MULTIPLE = 8
ABSOLUTE_MIN_SIDE = 32
ABSOLUTE_MAX_SIDE = 2048
MAX_SEED = UINT64_MAX  # torch.Generator.manual_seed takes 0..2**64-1
MAX_TRAIN_SEED = MAX_SEED - 8  # the trainer seeds its generators with seed .. seed + 3

SamplingSteps = Annotated[int, Field(ge=1, le=MAX_STEPS, description="DPM-Solver++ steps")]
GuidanceScale = Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="CFG scale; ≤ 1 disables CFG")]
ImageCount = Annotated[int, Field(ge=1, le=MAX_IMAGES, description="number of images")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

# Training runs as the platform stores them (job rows keep the step count in a 32-bit column).
MAX_TRAIN_STEPS = 1_000_000
TrainSteps = Annotated[int, Field(gt=0, le=MAX_TRAIN_STEPS, description="optimizer steps")]
StepInterval = Annotated[int, Field(gt=0, le=MAX_TRAIN_STEPS, description="a number of optimizer steps")]

# Counters and quotas, bounded by their database columns.
Int32 = Annotated[int, Field(ge=0, le=INT32_MAX)]
BigInt = Annotated[int, Field(ge=0, le=INT64_MAX)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
EventId = Annotated[int, Field(ge=0, le=INT64_MAX, description="a job event's id")]


# -- strict numbers ----------------------------------------------------------------------------------------


def _leaves(annotation: Any) -> list[Any]:
    """The alternatives of a type: `Annotated` unwrapped, unions flattened."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _leaves(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [leaf for member in typing.get_args(annotation) for leaf in _leaves(member)]
    return [annotation]


def _takes_string(leaf: Any, value: str) -> bool:
    if typing.get_origin(leaf) is Literal:
        return value in typing.get_args(leaf)
    return leaf not in (int, float, bool, type(None)) and typing.get_origin(leaf) is None


def _lax_number(annotation: Any, value: Any) -> tuple[str, str] | None:
    """(path suffix, reason) when `value` is something pydantic's lax mode would convert between numbers,
    booleans and strings for `annotation` (`true` → 1, `"30"` → 30, `1` → true); None when it is fine.
    List and tuple items are checked one by one (the suffix then names the item)."""
    leaves = _leaves(annotation)
    if Any in leaves or object in leaves:
        return None
    numeric = any(leaf in (int, float) for leaf in leaves)
    if isinstance(value, bool):
        if numeric and bool not in leaves:
            return "", "must be a number, not a boolean"
        return None
    if isinstance(value, str):
        if (numeric or bool in leaves) and not any(_takes_string(leaf, value) for leaf in leaves):
            return "", f"must be a {'number' if numeric else 'boolean'}, not the string {value[:40]!r}"
        return None
    if isinstance(value, (int, float)) and bool in leaves and not numeric:
        return "", f"must be true or false, got {value!r}"
    if isinstance(value, (list, tuple)):
        for leaf in leaves:
            if typing.get_origin(leaf) in (list, tuple, set, frozenset):
                args = [a for a in typing.get_args(leaf) if a is not Ellipsis] or [Any]
                for i, item in enumerate(value):
                    item_type = args[i] if typing.get_origin(leaf) is tuple and len(args) > 1 and i < len(args) else args[0]
                    if (found := _lax_number(item_type, item)) is not None:
                        return f".{i}{found[0]}", found[1]
    return None


def _field_keys(name: str, info) -> list[str]:
    keys = [name]
    alias = info.validation_alias or info.alias
    if isinstance(alias, str):
        keys.append(alias)
    elif isinstance(alias, AliasChoices):
        keys += [choice for choice in alias.choices if isinstance(choice, str)]
    return keys


class StrictInput(BaseModel):
    """A model for input read from JSON or YAML: unknown fields refused, floats finite, and numbers and
    booleans strict (`steps: true`, `steps: "30"` and `flag: 1` are refused rather than converted).

    pydantic's `strict` mode would also refuse a JSON list for a tuple and a string for an enum, which YAML and
    JSON can only send that way; this refuses only the conversions between numbers, booleans and strings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, info in cls.model_fields.items():
            for key in _field_keys(name, info):
                if key in data and (found := _lax_number(info.annotation, data[key])) is not None:
                    raise FieldError(key + found[0], found[1])
        return data


def load_yaml_strictly(text: str) -> Any:
    """`yaml.safe_load`, refusing a key given twice in one mapping (PyYAML keeps the last one silently) with a
    FieldError naming its dotted path, as the JSON reader of the REST API does."""
    import yaml

    def walk(node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                if name in seen:
                    raise FieldError(".".join((*path, name)),
                                     f"this key appears more than once in its mapping (line {key.start_mark.line + 1})")
                seen.add(name)
                walk(value, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*path, str(index)))

    walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    return yaml.safe_load(text)
