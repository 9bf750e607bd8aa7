"""qtrap proxy: an OpenAI-compatible proxy that measures what each LLM request costs."""

from qtrap_common.version import version

__version__ = version()
