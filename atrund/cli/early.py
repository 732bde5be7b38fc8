"""Signal handlers for `atrund serve`, installed before anything else is imported.

The CLI's imports take about 100 ms, and a SIGTERM that arrives then must stop `serve` cleanly
rather than kill it mid-start. What arrives early is remembered here and acted on as soon as
the runner's event loop runs (see atrund.cli.operator.serve). Keep this module free of imports
beyond the standard library's signal and sys.
"""

import signal
import sys

signals: list[int] = []
if sys.argv[1:2] == ["serve"]:
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda signum, frame: signals.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload asked before the runner runs: it reads the file anyway
