"""Errors the store raises. Servicers map them to gRPC codes (NotFoundError → NOT_FOUND,
ConflictError → ALREADY_EXISTS, its labeling-task kinds TaskClosedError →
FAILED_PRECONDITION and NotYourTaskError → PERMISSION_DENIED, InvalidArgumentError →
INVALID_ARGUMENT); the store itself knows nothing of gRPC."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised on purpose by the store."""


class SchemaError(StoreError):
    """The file's schema version cannot be used by this code."""


class SchemaTooNewError(SchemaError):
    """The file was written by a newer rlhf-loop than this one: refuse rather than guess."""


class StoreClosedError(StoreError):
    """A write or read was submitted after `Store.close()`, or to a read-only store."""


class NotFoundError(StoreError, LookupError):
    """A row the operation needs does not exist."""


class ConflictError(StoreError):
    """The operation contradicts the stored state (an expired or already answered lease,
    an idempotency key reused with a different payload, a forbidden state transition)."""


class TaskClosedError(ConflictError):
    """A labeling task that cannot be answered now: its lease expired, it was already
    answered, or its completions are still being sampled."""


class NotYourTaskError(ConflictError):
    """A labeling task leased to another labeler."""


class InvalidArgumentError(StoreError, ValueError):
    """The arguments are malformed regardless of what is stored."""
