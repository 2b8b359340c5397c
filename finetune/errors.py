"""The errors finetune raises on purpose.

Every error a user can cause is a :class:`FinetuneError`. Each class also subclasses the built-in that fits,
so callers may catch ``LookupError`` or ``ValueError`` without knowing our names. The CLI prints ``str(err)``
on one line and exits with ``err.exit_code``: 2 for usage errors (the command line, a name, a ref or a config
is malformed), 1 for everything else.
"""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 300) -> str:
    """A library's exception (or what caused it) as one short line, for inclusion in our own messages."""
    cause = err.__cause__ or err
    text = " ".join(str(cause).split()) or "no details"
    return f"{type(cause).__name__}: {text}"[:limit]


class FinetuneError(Exception):
    """Base class: a message that says what was wrong, and optionally a hint that says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} — {self.hint}"


class UsageError(FinetuneError, ValueError):
    """The user typed something malformed: a name, a ref, an option, a config value."""

    exit_code = 2


class InvalidNameError(UsageError):
    """An owner, model or alias name does not match the accepted pattern."""


class InvalidRefError(UsageError):
    """A version reference does not parse."""


class AmbiguousRefError(UsageError):
    """A hex prefix names more than one version."""


class ConfigError(UsageError):
    """A training config has problems; ``problems`` lists every one, each naming its dotted key."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            message = f"{where}{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(message)


class NotFoundError(FinetuneError, LookupError):
    """Something named does not exist."""


class ModelNotFoundError(NotFoundError):
    """No destination model of that name in the registry."""


class VersionNotFoundError(NotFoundError):
    """No version matches the reference."""


class TrainingNotFoundError(NotFoundError):
    """No training record of that id."""


class AlreadyExistsError(FinetuneError, FileExistsError):
    """Creating something that exists already."""


class ConflictError(FinetuneError, RuntimeError):
    """The operation is refused because of the registry's state (a version still in use, a model with versions)."""


class IntegrityError(FinetuneError, ValueError):
    """Stored bytes do not match their manifest: a damaged or tampered version."""


class RegistryAccessError(FinetuneError, PermissionError):
    """The registry root cannot be read or written."""


class DataError(FinetuneError, ValueError):
    """A dataset file is missing, malformed, empty, or does not fit the chosen format."""


class ModelLoadError(FinetuneError, RuntimeError):
    """A base model or adapter cannot be found or loaded."""


class TrainingCanceled(FinetuneError):
    """A run was stopped by Ctrl-C, SIGTERM or ``finetune trainings cancel``."""

    exit_code = 130


class AuthenticationError(FinetuneError):
    """A request to the service carries no token, or one that is unknown or revoked."""


class PermissionDeniedError(FinetuneError, PermissionError):
    """The account may see the thing but may not do this to it (only its owner may)."""


class TooLargeError(UsageError):
    """An upload or a request body is over the size limit the server was started with."""
