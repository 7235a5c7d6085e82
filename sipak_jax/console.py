"""What a user reads on the console: one-line user errors and quiet libraries.

- `UserError`: a mistake the user can fix (a missing dataset, missing weights, a wrong path, a
  config that does not fit the workdir). Its message is one line naming what is missing and the
  command that fixes it; the entry points (`main.py`, `predict`, `explain`, `report`) print it
  as `error: ...` on stderr, with no traceback, and exit with `EXIT_USER_ERROR` (2).
- `fail(message) -> SystemExit`: prints `error: message` and returns the SystemExit to raise.
- `quiet_libraries(verbosity)`: hides library chatter (orbax internals, TensorFlow's start-up,
  TFDS progress bars and INFO lines, absl INFO from libraries) unless `verbosity >= 1`
  (`--verbosity=1`, absl's own flag, on every command: INFO; 2: DEBUG). Errors always show.
- `say(text)`: our own console lines (stdout, flushed), which no verbosity hides.
- `native_stderr_quiet()`: a context manager that swallows what native code (TensorFlow's C++
  start-up lines) writes to file descriptor 2 while quiet; shown again if the block fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

EXIT_USER_ERROR = 2

# Libraries whose INFO and WARNING records are chatter on a normal run (their errors show).
_CHATTY = ("orbax", "tensorflow_datasets", "tensorflow", "clu", "etils", "array_record")

_state = {"verbose": True}


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to run."""


def fail(message: str) -> SystemExit:
    """Prints `error: message` (one line, stderr) and returns the SystemExit to raise."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return SystemExit(EXIT_USER_ERROR)


def say(text: str = "") -> None:
    """One of our own console lines (stdout), shown at every verbosity."""
    print(text, flush=True)


def is_verbose() -> bool:
    """True unless `quiet_libraries` was called with verbosity < 1."""
    return _state["verbose"]


class _LibraryFilter(logging.Filter):
    """Drops records below ERROR that come from a chatty library's files."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        path = (record.pathname or "").replace(os.sep, "/")
        return not any(f"/{name}/" in path for name in _CHATTY)


_FILTER = _LibraryFilter()


def quiet_libraries(verbosity: int | bool = 0) -> None:
    """Hides library chatter unless `verbosity >= 1` (call before the libraries start).

    Quiet: absl and Python logging show WARNING and above, minus the INFO/WARNING records of
    orbax, TFDS, TensorFlow and clu; TensorFlow's C++ logging shows errors only; TFDS progress
    bars are off. Verbose: nothing is hidden; `--verbosity=1` shows every library's INFO
    lines, `--verbosity=2` (absl's DEBUG) their debugging lines too.
    """
    from absl import logging as absl_logging

    verbose = int(verbosity) >= 1
    _state["verbose"] = verbose
    handler = absl_logging.get_absl_handler()
    if verbose:
        handler.removeFilter(_FILTER)
        absl_logging.get_absl_logger().removeFilter(_FILTER)
        if int(verbosity) == 1:  # absl's 1 is DEBUG: thousands of lines; 1 shows INFO here
            absl_logging.set_verbosity(absl_logging.INFO)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    handler.addFilter(_FILTER)
    absl_logging.get_absl_logger().addFilter(_FILTER)
    if "tensorflow_datasets" in sys.modules:
        disable_tfds_progress()


def disable_tfds_progress() -> None:
    """Turns TFDS's progress bars off when quiet (they print 'Downloading ... Unknown size')."""
    if not is_verbose():
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()


@contextlib.contextmanager
def native_stderr_quiet():
    """While quiet, what native code writes to fd 2 (TensorFlow's C++ start-up lines) is kept
    in a temporary file and dropped; if the block raises, it is written out first."""
    if is_verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", "replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
