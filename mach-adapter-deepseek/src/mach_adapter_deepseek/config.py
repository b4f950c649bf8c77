"""``ModelArgs`` from either config dialect DeepSeek-V4 checkpoints ship.

transformers writes ``layer_types``, ``mlp_layer_types``, ``compress_rates`` and nested
``rope_parameters`` (``main`` / ``compress``); the release's own config.json has
``compress_ratios`` (one 0/4/128 per layer, plus the MTP block's), ``num_hash_layers``,
``qk_rope_head_dim`` and ``rope_scaling``. Both become the same arguments.

Both dialects spell out the model's shape, so those keys are required; the rest default to
V4-Flash's values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from mach.config import AtLeast, ConfigReader, PositiveInt
from mach.errors import ConfigError

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
AttentionKind = Literal["sliding_attention", "compressed_sparse_attention",
                        "heavily_compressed_attention"]  # fmt: skip
MlpKind = Literal["hash_moe", "moe"]


@dataclass
class ModelArgs:
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    moe_intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    head_dim: PositiveInt
    num_experts_per_tok: PositiveInt
    n_routed_experts: PositiveInt
    q_lora_rank: PositiveInt = 1024
    routed_scaling_factor: float = 1.5
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    hc_mult: PositiveInt = 4
    hc_sinkhorn_iters: PositiveInt = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: PositiveInt = 128
    o_groups: PositiveInt = 8
    o_lora_rank: PositiveInt = 1024
    index_n_heads: PositiveInt = 64
    index_head_dim: PositiveInt = 128
    index_topk: PositiveInt = 512
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    scoring_func: str = "sqrtsoftplus"
    qk_rope_head_dim: PositiveInt = 64
    layer_types: list[AttentionKind] = field(default_factory=list)
    mlp_layer_types: list[MlpKind] = field(default_factory=list)
    compress_rates: dict[str, int] = field(default_factory=dict)
    mtp_layer_type: str = SLIDING
    compress_rope: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        read = ConfigReader(config)
        args = read.fields(cls, skip={"layer_types", "mlp_layer_types", "compress_rates",
                                      "mtp_layer_type", "compress_rope"})  # fmt: skip
        hub = read.fields(_Dialects)
        n = args.num_hidden_layers
        if args.scoring_func != "sqrtsoftplus":
            raise ConfigError(
                f"scoring_func {args.scoring_func!r} is not supported (only 'sqrtsoftplus')"
            )
        read.at_most(args, "num_experts_per_tok", "n_routed_experts")
        read.multiple_of(args, "num_attention_heads", "o_groups")
        args.compress_rates = {CSA: 4, HCA: 128, **hub.compress_rates}
        for kind, rate in ((CSA, hub.compress_rate_csa), (HCA, hub.compress_rate_hca)):
            if rate:
                args.compress_rates[kind] = rate
        kinds = {0: SLIDING, args.compress_rates[CSA]: CSA, args.compress_rates[HCA]: HCA}
        ratios = hub.compress_ratios
        if hub.layer_types:
            args.layer_types = hub.layer_types[:n]
        elif ratios is not None:
            if any(r not in kinds for r in ratios):
                raise ConfigError(f"compress_ratios {ratios} has values other than {set(kinds)}")
            args.layer_types = [kinds[r] for r in ratios[:n]]
            if len(ratios) > n:
                args.mtp_layer_type = kinds[ratios[n]]
        else:
            args.layer_types = [HCA] * min(n, 2) + [
                CSA if i % 2 else HCA for i in range(max(n - 2, 0))
            ]
        if hub.mlp_layer_types:
            args.mlp_layer_types = hub.mlp_layer_types[:n]
        else:
            hashed = hub.num_hash_layers
            args.mlp_layer_types = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
        if len(args.layer_types) != n or len(args.mlp_layer_types) != n:
            raise ConfigError(
                f"deepseek_v4 config lists {len(args.layer_types)} attention and "
                f"{len(args.mlp_layer_types)} MoE layer types for {n} layers"
            )
        if hub.partial_rotary_factor and "qk_rope_head_dim" not in config:
            args.qk_rope_head_dim = int(args.head_dim * hub.partial_rotary_factor)
        rope = hub.rope_parameters
        if isinstance(rope.get("compress"), Mapping):
            compress = dict(rope["compress"])
            args.rope_theta = float(rope.get("main", {}).get("rope_theta", args.rope_theta))
        else:
            compress = dict(hub.rope_scaling or rope)
            compress["rope_theta"] = args.compress_rope_theta
        args.compress_rope = compress
        return args

    @property
    def ratio(self) -> dict[str, int]:
        return {SLIDING: 0, **self.compress_rates}


@dataclass
class _Dialects:
    """The keys only one dialect writes, read and checked before they become arguments."""

    layer_types: list[AttentionKind] | None = None
    mlp_layer_types: list[MlpKind] | None = None
    compress_rates: dict[str, PositiveInt] = field(default_factory=dict)
    compress_rate_csa: PositiveInt | None = None
    compress_rate_hca: PositiveInt | None = None
    compress_ratios: list[int] | None = None
    num_hash_layers: Annotated[int, AtLeast(0)] = 3
    partial_rotary_factor: float | None = None
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    rope_scaling: dict[str, Any] | None = None
