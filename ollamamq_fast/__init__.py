"""ollamamq-fast: a fair, fast gateway for a fleet of LLM servers."""

__version__ = "0.1.0"
