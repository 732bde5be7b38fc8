"""The atrund command line, split by audience: ``author`` (publish, invoke, call, result,
secret seal), ``standing`` (schedule, trigger, result list, status), ``operator`` (serve, check-config, access, quarantine, keys, exec), ``state`` (bundles' state: operators and authors) and ``host``
(doctor, image build, schema), on the group, helpers and error handling in ``main``.

JSON results go to stdout (pipe them to jq); progress and errors go to stderr.
"""

from atrund.cli import early  # noqa: F401, I001 - first: it installs serve's signal handlers before the imports below

from atrund.cli import author, host, operator, standing, state  # noqa: F401, E402 - each registers its commands on main
from atrund.cli.group import main  # noqa: E402

__all__ = ["main"]
