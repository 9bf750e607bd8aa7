"""qtrap load generator: replays GSM8K/MathQA reasoning chains through a qtrap proxy at controlled
concurrency, scores the answers, and locates B* (``python -m loadgen --help``)."""

from qtrap_common.version import version

__version__ = version()
