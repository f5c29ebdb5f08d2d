"""One exception root; the CLI turns any of these into one line on stderr and exit code 2."""

from __future__ import annotations

from modelspec.errors import ContractError, ManifestError, SpecError  # noqa: F401  (the contract's own)


class ModelkitError(Exception):
    """A problem the user can fix (bad input, bad files); never a bug in modelkit itself."""


class DatasetError(ModelkitError):
    """The image folder cannot be used for training."""




class ExportError(ModelkitError):
    """The trained model could not be written as a model version."""
