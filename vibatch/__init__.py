"""vibatch: per-job virtual machines for batch systems."""
__version__ = "0.1.0"
