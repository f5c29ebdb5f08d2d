"""One exception root; the CLI turns any of these into one line on stderr and exit code 2."""

from __future__ import annotations


class ModelkitError(Exception):
    """A problem the user can fix (bad input, bad files); never a bug in modelkit itself."""


class DatasetError(ModelkitError):
    """The image folder cannot be used for training."""


class ManifestError(ModelkitError):
    """A model version directory is missing, incomplete or does not match its manifest."""


class ExportError(ModelkitError):
    """The trained model could not be written as a model version."""
