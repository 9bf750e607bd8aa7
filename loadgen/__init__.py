"""qtrap load generator: replays GSM8K/MathQA reasoning chains through a qtrap proxy at controlled
concurrency, scores the answers, and locates B* (``python -m loadgen --help``)."""

from importlib import metadata


def _version() -> str:
    """The version in pyproject.toml (its one home): from the installed package's metadata, or read
    from pyproject.toml itself in a source tree that is on the path but not installed."""
    try:
        return metadata.version("qtrap")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        try:
            with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
                return str(tomllib.load(f)["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()
