"""arsr: next-scale autoregressive image super-resolution on Lightning.

The frame lives here (CLI, LightningModules, data module, component interfaces,
checkpoint I/O); swappable implementations live in :mod:`arsr.components`.
"""

__version__ = "0.1.0"
