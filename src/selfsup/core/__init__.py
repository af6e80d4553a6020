"""The torch-free base layer: errors, options and config files, registries, the run folder."""

__version__ = "0.1.0"
