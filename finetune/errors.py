"""The errors finetune raises on purpose.

Every error a user can cause is a :class:`FinetuneError`. Each class also subclasses the built-in that fits,
so callers may catch ``LookupError`` or ``ValueError`` without knowing our names. The CLI prints ``str(err)``
on one line and exits with ``err.exit_code``: 2 for usage errors (the command line, a name, a ref or a config
is malformed), 1 for everything else. The HTTP API answers with ``err.http_status``: 422 for input it cannot
use (with :class:`ConfigError`'s list of problems), 404 not found, 409 conflicts with the registry's state, 429
a limit of the server reached, 500 for damage or failures on the server's side.
"""

from __future__ import annotations

from collections.abc import Sequence


def one_line(err: BaseException, limit: int = 300) -> str:
    """A library's exception (or what caused it) as one short line, for inclusion in our own messages."""
    cause = err.__cause__ or err
    text = " ".join(str(cause).split()) or "no details"
    return f"{type(cause).__name__}: {text}"[:limit]


class FinetuneError(Exception):
    """Base class: a message that says what was wrong, and optionally a hint that says how to fix it."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} — {self.hint}"


class UsageError(FinetuneError, ValueError):
    """The user typed something malformed: a name, a ref, an option, a config value."""

    exit_code = 2
    http_status = 422


class InvalidNameError(UsageError):
    """An owner, model or alias name does not match the accepted pattern."""


class InvalidRefError(UsageError):
    """A version reference does not parse."""


class AmbiguousRefError(UsageError):
    """A hex prefix names more than one version."""


class ConfigError(UsageError):
    """A training config has problems; ``problems`` lists every one, each naming its dotted key.

    Each problem is given as its text, or as ``(field, text)`` where ``field`` is the dotted key it is about;
    ``fields`` lists them all as ``{"field": key or "", "message": text}`` (what a form shows beside its fields).
    """

    def __init__(self, problems: Sequence[str | tuple[str, str]], source: str | None = None):
        self.fields = [_field_problem(p) for p in problems]
        self.problems = [p["message"] for p in self.fields]
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            message = f"{where}{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(message)


class InputError(UsageError):
    """A request's input has problems at named fields; ``fields`` lists every one as ``{"field": path,
    "message": text}`` (the path as the input names it: ``temperature``, ``messages[0]``), and the message says
    them all, each as ``input.FIELD: text``."""

    def __init__(self, fields: Sequence[tuple[str, str]], hint: str | None = None):
        self.fields = [{"field": field, "message": text} for field, text in fields]
        super().__init__("; ".join(f"input.{field}: {text}" for field, text in fields), hint)


def _field_problem(problem: str | tuple[str, str]) -> dict[str, str]:
    field, text = problem if isinstance(problem, tuple) else ("", problem)
    return {"field": field, "message": text}


class NotFoundError(FinetuneError, LookupError):
    """Something named does not exist."""

    http_status = 404


class ModelNotFoundError(NotFoundError):
    """No destination model of that name in the registry."""


class VersionNotFoundError(NotFoundError):
    """No version matches the reference."""


class TrainingNotFoundError(NotFoundError):
    """No training record of that id."""


class AlreadyExistsError(FinetuneError, FileExistsError):
    """Creating something that exists already."""

    http_status = 409


class ConflictError(FinetuneError, RuntimeError):
    """The operation is refused because of the registry's state (a version still in use, a model with versions)."""

    http_status = 409


class LimitError(FinetuneError):
    """A limit the server was started with is reached (e.g. an account's queued trainings): retry later."""

    http_status = 429


class IntegrityError(FinetuneError, ValueError):
    """Stored bytes do not match their manifest: a damaged or tampered version."""

    http_status = 500


class RegistryAccessError(FinetuneError, PermissionError):
    """The registry root cannot be read or written."""

    # The server's own storage, not the caller's rights: 403 would tell a client to sign in as someone else.
    http_status = 500


class AccessDeniedError(FinetuneError, PermissionError):
    """The caller may not see or change this object (the service's access rules)."""

    http_status = 403


class DataError(FinetuneError, ValueError):
    """A dataset file is missing, malformed, empty, or does not fit the chosen format."""

    http_status = 422


class ModelLoadError(FinetuneError, RuntimeError):
    """A base model or adapter cannot be found, loaded, or trained the way the config asks."""

    http_status = 422  # the request names a base that cannot be used


class PackingError(ModelLoadError):
    """A model cannot train on packed rows: sequences packed into one row would see one another."""


class NonFiniteError(FinetuneError, ArithmeticError):
    """Numbers that must be finite are not: a training loss that diverged, an adapter holding inf or NaN weights."""

    http_status = 422  # the input (a learning rate, an uploaded adapter) produced it


class TrainingCanceled(FinetuneError):
    """A run was stopped by Ctrl-C, SIGTERM or ``finetune trainings cancel``."""

    exit_code = 130
    http_status = 409  # the training was stopped on request


class AuthenticationError(FinetuneError):
    """A request to the service carries no token, or one that is unknown or revoked."""

    http_status = 401


class TooLargeError(UsageError):
    """An upload or a request body is over the size limit the server was started with."""

    http_status = 413


class TrainingStalledError(FinetuneError, ArithmeticError):
    """A run whose updates stopped changing anything: its loss sits still over different data, or its gradients
    are all zero (most often a learning rate far too high)."""

    http_status = 422  # the input (a learning rate) produced it


class UnavailableError(FinetuneError, RuntimeError):
    """The server cannot do it right now (e.g. an inference worker died); the same request may succeed later."""

    http_status = 503
