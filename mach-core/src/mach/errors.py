"""Errors mach raises for bad input; each message names what is wrong and what to do."""

from __future__ import annotations


class MachError(Exception):
    """Base class of every error mach raises on purpose."""


class CheckpointError(MachError):
    """A checkpoint on disk cannot be used as it is."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs is not there."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated or its header cannot be parsed."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from what the architecture's config implies."""


class UnknownArchitectureError(MachError):
    """No installed adapter claims the checkpoint's architecture."""


class AdapterError(MachError):
    """An adapter is misconfigured or does not meet the MoeArchAdapter contract."""


class ConfigError(CheckpointError):
    """``config.json`` lacks a field the architecture needs, or a field has the wrong type."""


class OptionsError(MachError, ValueError):
    """A load option has a value mach cannot use."""


class HubError(MachError):
    """A checkpoint could not be fetched from the Hugging Face hub."""
