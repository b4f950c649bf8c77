"""A third-party adapter package, installed from its own distribution, through the whole pipeline.

The expected logits come from a plain NumPy forward of the toy architecture written here, so the
check covers mach's loader, expert store, gather dispatch (with expert biases and GeGLU) and KV
cache as an outside adapter uses them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from mach import REGISTRY, load_moe, plugins
from mach.errors import ConfigError
from mach.experts.dispatch import GatherSwitchGLU

CONFIG = {"model_type": "toy_moe", "dim": 32, "heads": 4, "layers": 2, "experts": 6,
          "top_k": 2, "expert_dim": 16, "vocab": 40, "rope_theta": 10000.0}  # fmt: skip


def test_entry_point_is_installed() -> None:
    assert "toy_moe" in REGISTRY
    assert plugins.plugin_record("toymoe").distribution == "mach-adapter-toymoe"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dim": None}, "dim is null"),
        ({"experts": "six"}, 'experts should be a positive integer, found "six"'),
        ({"top_k": 7}, r"top_k \(7\) is more than experts \(6\)"),
        ({"heads": 5}, r"dim \(32\) is not a multiple of heads \(5\)"),
    ],
)
def test_outside_adapters_get_the_same_config_errors(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        REGISTRY["toy_moe"].build_model({**CONFIG, **changes})


def make_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    d, f, e, v = CONFIG["dim"], CONFIG["expert_dim"], CONFIG["experts"], CONFIG["vocab"]

    def r(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"embed.weight": r(v, d, scale=1.0), "norm.weight": 1 + r(d, scale=0.1),
         "head.weight": r(v, d)}  # fmt: skip
    for layer in range(CONFIG["layers"]):
        p = f"layers.{layer}"
        w[f"{p}.attn_norm.weight"] = 1 + r(d, scale=0.1)
        w[f"{p}.moe_norm.weight"] = 1 + r(d, scale=0.1)
        w[f"{p}.attn.qkv.weight"] = r(3 * d, d)
        w[f"{p}.attn.out.weight"] = r(d, d)
        w[f"{p}.moe.router.weight"] = r(e, d, scale=1.0)
        for x in range(e):
            q = f"{p}.moe.experts.{x}"
            w[f"{q}.wi_gate.weight"], w[f"{q}.wi_gate.bias"] = r(f, d), r(f)
            w[f"{q}.wi_up.weight"], w[f"{q}.wi_up.bias"] = r(f, d), r(f)
            w[f"{q}.wo.weight"], w[f"{q}.wo.bias"] = r(d, f), r(d)
    return w


def rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w


def rope(x: np.ndarray) -> np.ndarray:
    t, hd = x.shape[-2], x.shape[-1]
    freqs = CONFIG["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    angles = np.arange(t)[:, None] * freqs[None]
    cos, sin = np.cos(angles), np.sin(angles)
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_forward(w: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    d, heads, k = CONFIG["dim"], CONFIG["heads"], CONFIG["top_k"]
    h = w["embed.weight"][tokens].astype(np.float64)
    t = tokens.shape[0]
    for layer in range(CONFIG["layers"]):
        p = f"layers.{layer}"
        x = rms(h, w[f"{p}.attn_norm.weight"])
        q, kk, v = np.split(x @ w[f"{p}.attn.qkv.weight"].T, 3, axis=-1)
        q, kk, v = (a.reshape(t, heads, -1).transpose(1, 0, 2) for a in (q, kk, v))
        q, kk = rope(q), rope(kk)
        scores = q @ kk.transpose(0, 2, 1) / math.sqrt(d // heads)
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(t, d)
        h = h + attn @ w[f"{p}.attn.out.weight"].T
        x = rms(h, w[f"{p}.moe_norm.weight"])
        logits = x @ w[f"{p}.moe.router.weight"].T
        out = np.zeros_like(h)
        for i in range(t):
            top = np.argsort(-logits[i])[:k]
            gates = np.exp(logits[i, top] - logits[i, top].max())
            gates /= gates.sum()
            for g, e in zip(gates, top, strict=True):
                q_ = f"{p}.moe.experts.{e}"
                gate = w[f"{q_}.wi_gate.weight"] @ x[i] + w[f"{q_}.wi_gate.bias"]
                up = w[f"{q_}.wi_up.weight"] @ x[i] + w[f"{q_}.wi_up.bias"]
                out[i] += g * (w[f"{q_}.wo.weight"] @ (gelu(gate) * up) + w[f"{q_}.wo.bias"])
        h = h + out
    return rms(h, w["norm.weight"]) @ w["head.weight"].T


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("toy")
    weights = make_weights(np.random.default_rng(7))
    save_file(weights, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(CONFIG))
    return root, weights


def test_toy_checkpoint_matches_numpy(toy_checkpoint: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, weights = toy_checkpoint
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        model, tokenizer, store, cache = load_moe(root)
    assert tokenizer is None and store.stats()["layers"] == CONFIG["layers"]
    assert isinstance(model.layers[0].moe.switch, GatherSwitchGLU)
    tokens = np.array([3, 17, 5, 29, 11, 0, 38, 22, 9], dtype=np.int32)
    expected = reference_forward(weights, tokens)
    got = np.array(model(mx.array(tokens[None])))[0]
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    # and continued through the cache, one token at a time
    steps = [np.array(model(mx.array(tokens[None, :4]), cache=cache))[0]]
    for i in range(4, len(tokens)):
        steps.append(np.array(model(mx.array(tokens[None, i : i + 1]), cache=cache))[0])
    np.testing.assert_allclose(np.concatenate(steps), expected, atol=2e-4, rtol=0)


def test_sorted_dispatch_path_matches(toy_checkpoint: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, weights = toy_checkpoint
    with pytest.warns(UserWarning):
        model, _, _, _ = load_moe(root)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CONFIG["vocab"], size=40).astype(np.int32)  # 80 routes: sorted path
    got = np.array(model(mx.array(tokens[None])))[0]
    np.testing.assert_allclose(got, reference_forward(weights, tokens), atol=2e-4, rtol=0)
    assert model.layers[0].moe.switch.stats()["sorted_calls"] >= 1
