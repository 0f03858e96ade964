"""ollamamq-fast: a fair, fast gateway for a fleet of LLM servers."""

from ollamamq_fast import buildinfo as _buildinfo

__version__ = "0.1.0"

# Before any hot-path module loads: compiled extensions or the .py sources
# (OLLAMAMQ_FAST_PURE=1, or sources edited after the build).
_buildinfo.choose()
