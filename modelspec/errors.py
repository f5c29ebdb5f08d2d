"""The contract's exceptions: a model version or its spec that cannot be used as it is."""

from __future__ import annotations


class ContractError(ValueError):
    """A model version directory or its spec is wrong; the message names the file or key at fault."""


class ManifestError(ContractError):
    """A model version directory is missing, incomplete or does not match its manifest."""


class SpecError(ContractError):
    """A model spec is incomplete, inconsistent, or disagrees with the model it describes."""
