"""qtrap_sim: a vLLM/TGI-compatible inference server on a simulated GPU."""

__version__ = "0.1.0"
