"""What every ``python -m jqlora.<cli>`` does around its ``main()``: `run`.

A reader that goes away early (``python -m jqlora.plan ... | head -3``) closes the pipe; Python ignores SIGPIPE, so
the next write raises BrokenPipeError, and the interpreter's last flush at exit raises it again. `run` ends such a
run quietly, as Python's documentation recommends (signal module, "Note on SIGPIPE"): stdout pointed at devnull,
then exit 141 = 128 + SIGPIPE, what a shell reports for a writer killed by the signal (``set -o pipefail`` sees it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_BROKEN_PIPE = 141


def run(main: Callable[[], int | None]) -> NoReturn:
    """``sys.exit(main())``, without a traceback when stdout's reader is gone."""
    try:
        code = main()
        sys.stdout.flush()  # (what is still buffered may be what meets the closed pipe)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so the flush at exit has nowhere to fail)
        sys.exit(EXIT_BROKEN_PIPE)
    sys.exit(code)
