"""User-facing error types.

Every error a user can cause (a bad model id, a bad file, a bad option) is raised as a
:class:`BitquantError` subclass at the place that knows what is wrong. The message is one
line that names the problem and the fix; ``exit_code`` is what the command line returns.
Only ``cli/main.py`` prints them or exits.

Exit codes (documented in the README):

* 0: success
* 1: runtime failure (disk full, an internal error)
* 2: bad usage or bad input
* 3: a quality gate failed (the output is still written)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_GATE = 3


def describe(e: BaseException) -> str:
    """``e`` in one line for a message: its type and the first line of its text."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` is a failure to reach a server: an ``OSError`` (which huggingface_hub's
    HTTP errors also are), or a transport error of the HTTP client huggingface_hub uses
    (httpx or httpx2, by version: a refused connection or a timeout is not an ``OSError``)."""
    return isinstance(e, OSError) or any(c.__name__ in ("TransportError", "TimeoutException") for c in type(e).__mro__)


class BitquantError(Exception):
    """Base class: a message for the user and the exit code that goes with it."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(BitquantError):
    """An option value is invalid or inconsistent with another."""


class SourceError(BitquantError):
    """The model to convert or evaluate cannot be found, read or trusted."""


class UnsupportedModelError(BitquantError):
    """The checkpoint is readable but not a model bitquant knows how to quantize."""


class TensorError(BitquantError):
    """A weight cannot be quantized (NaN/Inf, wrong dtype, impossible shape)."""


class RecipeError(BitquantError):
    """A recipe file or option is invalid."""


class OutputError(BitquantError):
    """The output location cannot be used (exists, not writable)."""


class TextError(BitquantError):
    """An evaluation text is missing, empty, too short or not UTF-8 text."""


class WriteFailure(BitquantError):
    """Writing the output failed for a reason outside the user's input (e.g. disk full)."""

    exit_code = EXIT_RUNTIME
