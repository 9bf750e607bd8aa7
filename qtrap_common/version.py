"""The distribution's version, read from its one home, pyproject.toml."""

from importlib import metadata


def version() -> str:
    """The version in pyproject.toml: from the installed package's metadata, or read from
    pyproject.toml itself in a source tree that is on the path but not installed."""
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
