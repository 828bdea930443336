"""What every ``pymerge`` command shares: logging set-up and the one-line error policy.

Its own module so that commands defined outside cli.py import it without importing cli.py (which attaches
them), and ``python -m pymerge.cli`` has no import cycle.
"""

from __future__ import annotations

import functools
import logging
import sys

import click

from .errors import PymergeError

log = logging.getLogger("pymerge")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)


def _friendly_errors(fn):
    """Turn library errors (and OS errors on user paths) into ``error: ...`` and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        verbose = ctx.find_root().params.get("verbose", 0) or kwargs.get("verbose", 0)
        try:
            return fn(*args, **kwargs)
        except (PymergeError, OSError) as e:
            if verbose:
                raise
            msg = str(e) if isinstance(e, PymergeError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)

    return wrapper
