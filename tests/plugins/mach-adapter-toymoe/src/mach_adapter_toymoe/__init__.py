"""A tiny out-of-tree MoE family for mach."""

from mach_adapter_toymoe.adapter import ToyMoeAdapter

__all__ = ["ToyMoeAdapter"]
