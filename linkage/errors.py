"""Exceptions raised by the linkage core.

Hierarchy::

    LinkageError
    ├── InputError            a county file cannot be read (missing, unreadable, no record_id)
    ├── MappingError          a column-mapping config is invalid
    ├── TokenSpecError        a token spec is invalid, or two specs disagree
    ├── ModelError            a linkage model cannot be built, trained or loaded
    └── SecretError           a linkage secret is missing, too short or a placeholder

Row-level problems are not exceptions: they are reported as ``RecordIssue`` values
(see ``linkage.normalise``) so that one bad row never stops the rest of a file.
Messages never contain personal data: they name files, rows and columns, not values.
"""

from __future__ import annotations


class LinkageError(Exception):
    """Base class of every error the linkage core raises on purpose."""


class InputError(LinkageError):
    """A county export cannot be read (missing file, unknown format, undecodable, no record_id)."""


class MappingError(LinkageError):
    """A column mapping is invalid; the message lists every problem found."""


class TokenSpecError(LinkageError):
    """A token spec is invalid, or tokens were made under a different spec."""


class ModelError(LinkageError):
    """A linkage model cannot be built, trained or loaded."""


class SecretError(LinkageError):
    """A federation secret is missing, too short, or a placeholder."""
