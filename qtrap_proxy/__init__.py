"""qtrap proxy: an OpenAI-compatible proxy that measures what each LLM request costs."""

__version__ = "0.1.0"
