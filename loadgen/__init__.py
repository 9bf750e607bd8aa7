"""qtrap load generator: replays GSM8K/MathQA reasoning chains through a qtrap proxy at controlled
concurrency, scores the answers, and locates B* (``python -m loadgen --help``)."""

__version__ = "0.1.0"
