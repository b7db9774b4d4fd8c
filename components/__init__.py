"""Swappable components, one family per sub-package (installed as ``arsr.components``)."""
