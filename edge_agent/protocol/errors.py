"""Error families, one per trust boundary."""

from __future__ import annotations


class BundleError(Exception):
    """A model bundle cannot be used: bad manifest, missing, extra or altered file."""


class ManifestError(BundleError):
    """``bundle.json`` is not valid JSON or does not match the schema."""


class BundleFileError(BundleError):
    """A file of the bundle is missing, not listed, or does not match its hash or length.

    ``path`` is the file's path relative to the bundle directory.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
