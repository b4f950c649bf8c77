"""DFlash: block-diffusion drafts conditioned on the target's hidden states (``specdec_v7``)."""

from mach.decode.dflash.config import (
    DFlashConfig,
    default_target_layers,
    draft_folder,
    read_dflash_config,
)
from mach.decode.dflash.drafter import DFlashDrafter, load_dflash, make_dflash_drafter
from mach.decode.dflash.model import DFlashDraftModel

__all__ = [
    "DFlashConfig",
    "DFlashDraftModel",
    "DFlashDrafter",
    "default_target_layers",
    "draft_folder",
    "load_dflash",
    "make_dflash_drafter",
    "read_dflash_config",
]
