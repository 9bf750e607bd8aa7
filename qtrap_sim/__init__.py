"""qtrap_sim: a vLLM/TGI-compatible inference server on a simulated GPU."""

from qtrap_common.version import version

__version__ = version()
