"""One error for bad input: `FieldError(field, message)`, and one way to make it from a pydantic `ValidationError`.

Every edge (a spec file, a CLI flag, a REST body, a generate request) reports bad input as the dotted path of
the offending value and one sentence about it. The library's own errors (`SpecError`, `GenerationError`,
`PromptError`) are `FieldError`s, so a caller handles them all alike.
"""

from __future__ import annotations

from pydantic import ValidationError


class FieldError(ValueError):
    """Bad input. `field` is the dotted path of the offending value ('' for the input as a whole)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def within(self, prefix: str) -> "FieldError":
        """The same error, its field under `prefix` (e.g. `spec`), keeping its class."""
        if not prefix:
            return self
        moved = self.__class__.__new__(self.__class__)
        FieldError.__init__(moved, f"{prefix}.{self.field}" if self.field else prefix, self.message)
        return moved


def _path(loc) -> str:
    return ".".join(str(part) for part in loc)


def field_error(err: ValidationError | list[dict], *, prefix: str = "", drop: tuple[str, ...] = ()) -> FieldError:
    """The first problem of `err` (a ValidationError, or the error list FastAPI's RequestValidationError holds)
    as a FieldError naming its field.

    A FieldError raised inside a validator arrives wrapped by pydantic; it is unwrapped and its own field is
    kept (under the location it was raised at). `drop` removes leading location parts that are not the
    caller's fields (FastAPI's `body`, `query`, `path`). Other problems are summarised after the first.
    """
    problems = err.errors(include_url=False) if isinstance(err, ValidationError) else list(err)
    located = []
    for problem in problems:
        loc = list(problem.get("loc", ()))
        while loc and loc[0] in drop:
            loc.pop(0)
        located.append((loc, problem))
    for loc, problem in located:
        inner = (problem.get("ctx") or {}).get("error")
        if isinstance(inner, FieldError):
            base = ".".join(part for part in (prefix, _path(loc)) if part)
            return inner.within(base) if base else inner
    loc, first = located[0]
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = "unknown field"
    elif "input" in first and kind not in ("missing", "value_error", "extra_forbidden", "model_type", "dict_type"):
        shown = repr(first["input"])
        message = f"{message} (got {shown[:80] + '…' if len(shown) > 80 else shown})"
    if len(located) > 1:
        others = ", ".join(_path(loc) or "(input)" for loc, _ in located[1:4])
        message += f" (also invalid: {others}{', …' if len(located) > 4 else ''})"
    return FieldError(".".join(part for part in (prefix, _path(loc)) if part), message)
