"""Errors raised by the fleet TUF repository (the signing side, not the device's verifier)."""


class RepositoryError(Exception):
    """A repository operation was refused: bad keys, bad input, or a conflicting release."""
