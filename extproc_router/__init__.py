"""extproc-router: an Envoy ext_proc routing gateway for LLM inference."""

__version__ = "0.1.0"
