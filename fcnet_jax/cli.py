"""What every command-line tool of this project shares (absl flags, as `main.py`).

A bad input (a missing file, a corrupt image, a flag that cannot work) ends the tool with ONE line on stderr
naming it, and exit status 1; `--verbose` adds the Python traceback. Usage errors (unknown or missing flags)
stay absl's, with exit status 1 and the flag help hint.
"""
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags

flags.DEFINE_bool("verbose", False, "On an error, also print the Python traceback.")


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`absl.app.run(main)`, with errors reported as one line unless --verbose."""

  def guarded(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    try:
      main(argv)
    except (app.UsageError, KeyboardInterrupt, SystemExit):
      raise
    except Exception as e:  # pylint: disable=broad-except
      if flags.FLAGS.verbose:
        raise
      print(f"error: {type(e).__name__}: {e}  (--verbose shows the traceback)", file=sys.stderr)
      sys.exit(1)

  app.run(guarded)
