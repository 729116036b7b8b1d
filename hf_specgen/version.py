"""The package's version, in a module of its own so that submodules read it without importing `hf_specgen`."""

__version__ = "0.1.0"
