"""What an identifier is: a UUID in its canonical text form, lower-case 8-4-4-4-12 hex (RFC 9562 section 4).

One definition for the rules' `format: uuid` check and the CDC column typing, so every input the validator
accepts carries ids that each store's column type takes (ClickHouse `UUID`, the others' strings) and that
compare equal as strings exactly when they are the same UUID.

Upper-case hex is the same UUID (RFC 9562: case-insensitive on input) and is *normalised* to lower case, not
refused: a producer spelling ids in upper case is not wrong, and normalising makes a case-changed copy of an
event the duplicate it is. Braces, `urn:uuid:`, missing hyphens, other lengths, non-ASCII digits and control
characters are refused.
"""

from __future__ import annotations

import re
from typing import Any

NOT_A_UUID = "NOT_A_UUID"
CONTROL_CHARACTER = "CONTROL_CHARACTER"

# re.ASCII and explicit classes: `\d` or str.isdigit would accept other scripts' digits.
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)
_ANY_CASE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1

# The same two patterns for Arrow's RE2 (whole-value matches; ASCII classes mean the same in both engines).
CANONICAL_UUID = "^" + _CANONICAL.pattern + "$"
ANY_CASE_UUID = "^" + _ANY_CASE.pattern + "$"

is_canonical_uuid = _CANONICAL.fullmatch  # the hot path: a match object for a canonical id, else None


def uuid_problem(value: Any) -> tuple[str, str] | None:
    """None when `value` is a UUID in canonical or upper/mixed case, else (code, reason) saying what is wrong."""
    if value.__class__ is not str:
        return NOT_A_UUID, f"is a {type(value).__name__}, not UUID text"
    if _ANY_CASE.fullmatch(value) is not None:
        return None
    control = _CONTROL.search(value)
    if control is not None:
        return CONTROL_CHARACTER, f"contains the control character {control.group()!r} at {control.start()}"
    return NOT_A_UUID, "is not a UUID (8-4-4-4-12 hexadecimal digits)"


def canonical_uuid(value: Any) -> Any:
    """The canonical (lower-case) form of a UUID spelled in any case; any other value unchanged."""
    if value.__class__ is str and _CANONICAL.fullmatch(value) is None and _ANY_CASE.fullmatch(value) is not None:
        return value.lower()
    return value
