"""What qtrap's three products share: the proxy (``qtrap_proxy``), the simulator (``qtrap_sim``) and
the load generator (``loadgen``) each depend on this package and never on one another's internals.

It imports none of them (an import-linter contract in pyproject.toml, checked by the test suite) and
nothing heavier than the standard library, pydantic and orjson:

* :mod:`qtrap_common.wire`: the wire contract between them: header names, admin paths, the request
  record and chain summary types.
* :mod:`qtrap_common.precision`: precision labels' bit widths and the 16/32-bit baselines.
* :mod:`qtrap_common.background`: the background-task base and the one bounded way to stop a task.
* :mod:`qtrap_common.asgi`: raw-ASGI helpers shared by the proxy's and the simulator's routes.
* :mod:`qtrap_common.localproc`: child servers on loopback (free ports, start, wait, stop).
* :mod:`qtrap_common.version`: the distribution's version, from pyproject.toml.
"""
