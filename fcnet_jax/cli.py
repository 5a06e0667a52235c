"""What every command-line tool of this project shares (absl flags, as `main.py`).

A bad input (a missing file, a corrupt image, a flag that cannot work) ends the tool with ONE line on stderr
naming it, and exit status 1; `--verbose` adds the Python traceback. Usage errors (unknown or missing flags)
stay absl's, with exit status 1 and the flag help hint.
"""

import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags

flags.DEFINE_bool("verbose", False, "On an error, also print the Python traceback.")


def run(main: Callable[[Sequence[str]], None], define_flags: Optional[Callable[[], None]] = None) -> None:
  """`absl.app.run(main)`, with errors reported as one line unless --verbose.

  `define_flags` defines the tool's flags; tools define them on first use rather than at import, so that tests and
  other tools can import the module. A second call (flags already defined) is skipped.
  """
  if define_flags is not None:
    try:
      define_flags()
    except flags.DuplicateFlagError:
      pass

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
