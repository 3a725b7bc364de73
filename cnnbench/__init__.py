"""cnnbench: does a CNN training trick help, by how much, and at what cost? Measured, tracked, reported."""

__version__ = "0.1.0"
