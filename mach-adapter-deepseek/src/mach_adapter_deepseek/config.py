"""``ModelArgs`` from either config dialect DeepSeek-V4 checkpoints ship.

transformers writes ``layer_types``, ``mlp_layer_types``, ``compress_rates`` and nested
``rope_parameters`` (``main`` / ``compress``); the release's own config.json has
``compress_ratios`` (one 0/4/128 per layer, plus the MTP block's), ``num_hash_layers``,
``qk_rope_head_dim`` and ``rope_scaling``. Both become the same arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mach.config import config_fields, positive, require
from mach.errors import ConfigError

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"


@dataclass
class ModelArgs:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    routed_scaling_factor: float = 1.5
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    scoring_func: str = "sqrtsoftplus"
    qk_rope_head_dim: int = 64
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    compress_rates: dict[str, int] = field(default_factory=dict)
    mtp_layer_type: str = SLIDING
    compress_rope: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        derived = {"layer_types", "mlp_layer_types", "compress_rates", "compress_rope"}
        args = config_fields(cls, {k: v for k, v in config.items() if k not in derived})
        positive(
            args,
            "vocab_size",
            "hidden_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
            "num_experts_per_tok",
            "n_routed_experts",
            "sliding_window",
            "o_groups",
            "index_topk",
            "hc_mult",
        )
        require(
            args.num_experts_per_tok <= args.n_routed_experts,
            f"num_experts_per_tok ({args.num_experts_per_tok}) is more than n_routed_experts "
            f"({args.n_routed_experts})",
        )
        require(args.num_attention_heads % args.o_groups == 0,
                f"num_attention_heads ({args.num_attention_heads}) is not a multiple of o_groups "
                f"({args.o_groups})")  # fmt: skip
        n = args.num_hidden_layers
        if args.scoring_func != "sqrtsoftplus":
            raise ConfigError(
                f"deepseek_v4 scoring_func {args.scoring_func!r} is not supported (sqrtsoftplus)"
            )
        args.compress_rates = {CSA: 4, HCA: 128, **dict(config.get("compress_rates") or {})}
        for kind, key in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")):
            if config.get(key):
                args.compress_rates[kind] = int(config[key])
        kinds = {0: SLIDING, args.compress_rates[CSA]: CSA, args.compress_rates[HCA]: HCA}
        ratios = config.get("compress_ratios")
        if config.get("layer_types"):
            args.layer_types = list(config["layer_types"])[:n]
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
        if config.get("mlp_layer_types"):
            args.mlp_layer_types = list(config["mlp_layer_types"])[:n]
        else:
            hashed = int(config.get("num_hash_layers", 3))
            args.mlp_layer_types = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
        if len(args.layer_types) != n or len(args.mlp_layer_types) != n:
            raise ConfigError(
                f"deepseek_v4 config lists {len(args.layer_types)} attention and "
                f"{len(args.mlp_layer_types)} MoE layer types for {n} layers"
            )
        factor = config.get("partial_rotary_factor")
        if factor and "qk_rope_head_dim" not in config:
            args.qk_rope_head_dim = int(args.head_dim * float(factor))
        rope = config.get("rope_parameters")
        if isinstance(rope, Mapping) and isinstance(rope.get("compress"), Mapping):
            compress = dict(rope["compress"])
            args.rope_theta = float(rope.get("main", {}).get("rope_theta", args.rope_theta))
        else:
            compress = dict(config.get("rope_scaling") or (rope if isinstance(rope, Mapping)
                                                           else {}))  # fmt: skip
            compress["rope_theta"] = args.compress_rope_theta
        args.compress_rope = compress
        return args

    @property
    def ratio(self) -> dict[str, int]:
        return {SLIDING: 0, **self.compress_rates}
