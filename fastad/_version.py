"""The package version (its own module, so that modules can read it without importing fastad/__init__)."""
__version__ = "0.1.0"
