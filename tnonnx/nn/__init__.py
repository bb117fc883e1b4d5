"""Torch layers of the factorised formats, for fitting and for users who train."""
