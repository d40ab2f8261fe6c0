"""fastbn's version, read by ``fastbn.__version__`` and by the build (pyproject.toml)."""

__version__ = "0.3.0.dev0"
