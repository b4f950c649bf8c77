"""Write mach's golden fixtures: tiny random checkpoints plus the reference's own outputs.

Run it in a virtual environment of its own (torch CPU, transformers, mlx-lm), never in mach's:

    python -m venv .venv-fixtures
    .venv-fixtures/bin/pip install -r tools/requirements-fixtures.txt
    .venv-fixtures/bin/python tools/make_fixtures.py qwen3_moe

For each family it builds a model from the family's own transformers config class with random
weights (parameters that start at 0 or 1 are perturbed so they are exercised), saves it in
every on-disk layout people download, and records the reference logits:

- float layouts (HF per-expert, HF fused, sharded, tied, mlx-community stacked): transformers'
  logits, float32, eager attention;
- quantized layouts: mlx-lm's own converter writes the checkpoint and mlx-lm's logits are the
  reference.

Outputs go to tests/fixtures/<family>/<layout>/ with reference.npz next to the weights,
and tests/fixtures/<family>/VERSIONS.json records the tool versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

SEED = 20261125
PROMPT_LEN = 16
GREEDY_TOKENS = 12

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int, out: Path) -> None:
    """A byte-level BPE trained on the Python standard library, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))[:60]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def perturb_unit_params(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Parameters initialised to exactly 0 or 1 hide bugs; move them off those values."""
    with torch.no_grad():
        for _, param in model.named_parameters():
            data = param.data
            if torch.all(data == 1) or torch.all(data == 0):
                noise = torch.randn(data.shape, generator=generator) * 0.1
                data.add_(noise)


def perturb_layer_scalars(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Gemma 4's per-layer output scale is a buffer of ones, not a parameter."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.add_(torch.randn(buffer.shape, generator=generator) * 0.1)


def reference_inputs(vocab: int) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.integers(3, vocab, size=(2, PROMPT_LEN)).astype(np.int32)


def hf_reference(model: torch.nn.Module, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = torch.from_numpy(input_ids.astype(np.int64))
    with torch.no_grad():
        logits = model(ids).logits.float().numpy()
        greedy = model.generate(
            ids[:1],
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, ids.shape[1] :]
    return {
        "input_ids": input_ids,
        "logits": logits.astype(np.float32),
        "greedy": greedy.numpy().astype(np.int32),
    }


def mlx_reference(path: Path, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    logits = model(mx.array(input_ids)).astype(mx.float32)
    tokens = []
    for token, _ in generate_step(mx.array(input_ids[0]), model, max_tokens=GREEDY_TOKENS):
        tokens.append(int(token))
    return {
        "input_ids": input_ids,
        "logits": np.array(logits),
        "greedy": np.array([tokens], dtype=np.int32),
    }


def to_hub_dialect(config_path: Path) -> None:
    """Rewrite a transformers-5 config (rope_parameters) as older hub configs spell it."""
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config_path.write_text(json.dumps(config, indent=2))


def write_layout(out: Path, reference: dict[str, np.ndarray], tokenizer_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    np.savez(out / "reference.npz", **reference)
    (out / "generation_config.json").unlink(missing_ok=True)
    print(f"  wrote {out.relative_to(ROOT)}")


def make_qwen3_moe(tokenizer_dir: Path) -> None:
    from mlx_lm import convert
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    family = FIXTURES / "qwen3_moe"
    shutil.rmtree(family, ignore_errors=True)
    family.mkdir(parents=True)
    vocab = 512

    def build(**overrides: object) -> Qwen3MoeForCausalLM:
        torch.manual_seed(SEED)
        settings: dict[str, object] = {"mlp_only_layers": [1], **overrides}
        config = Qwen3MoeConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            initializer_range=0.08,
            max_position_embeddings=512,
            eos_token_id=2,
            **settings,
        )
        config._attn_implementation = "eager"
        model = Qwen3MoeForCausalLM(config).eval()
        generator = torch.Generator().manual_seed(SEED)
        perturb_unit_params(model, generator)
        return model

    input_ids = reference_inputs(vocab)
    model = build()
    ref = hf_reference(model, input_ids)

    out = family / "hf-per-expert"
    model.save_pretrained(out, save_original_format=True)
    write_layout(out, ref, tokenizer_dir)

    out = family / "hf-fused"
    model.save_pretrained(out, save_original_format=False)
    to_hub_dialect(out / "config.json")
    write_layout(out, ref, tokenizer_dir)

    out = family / "hf-sharded"
    model.save_pretrained(out, save_original_format=True, max_shard_size="400KB")
    write_layout(out, ref, tokenizer_dir)

    tied = build(tie_word_embeddings=True, decoder_sparse_step=2, mlp_only_layers=[])
    out = family / "hf-tied"
    tied.save_pretrained(out, save_original_format=True)
    to_hub_dialect(out / "config.json")
    write_layout(out, hf_reference(tied, input_ids), tokenizer_dir)

    with tempfile.TemporaryDirectory() as tmp:
        # mlx-lm reads only the hub dialect and only per-expert experts.
        source = Path(tmp) / "source"
        model.save_pretrained(source, save_original_format=True)
        to_hub_dialect(source / "config.json")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, source / name)

        out = family / "mlx-stacked"
        convert(str(source), str(out), dtype="float32")
        write_layout(out, ref, tokenizer_dir)

        for bits in (4, 8):
            out = family / f"mlx-q{bits}"
            convert(str(source), str(out), quantize=True, q_bits=bits, q_group_size=64)
            write_layout(out, mlx_reference(out, input_ids), tokenizer_dir)


def make_qwen3_5_moe(tokenizer_dir: Path) -> None:
    from mlx_lm import convert
    from transformers import (
        Qwen3_5MoeConfig,
        Qwen3_5MoeForCausalLM,
        Qwen3_5MoeForConditionalGeneration,
        Qwen3_5MoeTextConfig,
    )

    family = FIXTURES / "qwen3_5_moe"
    shutil.rmtree(family, ignore_errors=True)
    family.mkdir(parents=True)
    vocab = 512
    text = {
        "vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64, "max_position_embeddings": 512,
        "initializer_range": 0.08, "eos_token_id": 2,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "partial_rotary_factor": 0.25},
    }  # fmt: skip
    # Longer than one 64-token chunk of the chunked delta rule.
    rng = np.random.default_rng(SEED)
    input_ids = rng.integers(3, vocab, size=(2, 80)).astype(np.int32)

    def finish(model: torch.nn.Module) -> torch.nn.Module:
        model.config._attn_implementation = "eager"
        perturb_unit_params(model, torch.Generator().manual_seed(SEED))
        return model.eval()

    torch.manual_seed(SEED)
    causal = finish(Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**text)))
    out = family / "hf-per-expert"
    causal.save_pretrained(out, save_original_format=True)
    write_layout(out, hf_reference(causal, input_ids), tokenizer_dir)

    torch.manual_seed(SEED)
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": 64, "patch_size": 4, "temporal_patch_size": 2,
              "spatial_merge_size": 2, "in_channels": 3}  # fmt: skip
    config = Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    wrapper = finish(Qwen3_5MoeForConditionalGeneration(config))
    out = family / "hf-fused-wrapper"
    wrapper.save_pretrained(out, save_original_format=False)
    write_layout(out, hf_reference(wrapper, input_ids), tokenizer_dir)

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        wrapper.save_pretrained(source, save_original_format=False)
        config_path = source / "config.json"
        raw = json.loads(config_path.read_text())
        inner = raw["text_config"]
        rope = inner.pop("rope_parameters")
        inner["rope_theta"] = rope["rope_theta"]
        inner["partial_rotary_factor"] = rope["partial_rotary_factor"]
        inner["rope_scaling"] = {"rope_type": "default", "mrope_section": [1, 1, 0],
                                 "mrope_interleaved": True}  # fmt: skip
        config_path.write_text(json.dumps(raw, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, source / name)
        out = family / "mlx-q4"
        convert(str(source), str(out), quantize=True, q_bits=4, q_group_size=64)
        (out / "README.md").unlink(missing_ok=True)
        write_layout(out, mlx_reference(out, input_ids), tokenizer_dir)


def make_gpt_oss(tokenizer_dir: Path) -> None:
    import mlx.core as mx
    from safetensors.numpy import save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    family = FIXTURES / "gpt_oss"
    shutil.rmtree(family, ignore_errors=True)
    family.mkdir(parents=True)
    vocab = 512
    torch.manual_seed(SEED)
    config = GptOssConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"], initializer_range=0.08,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                         "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 128, "truncate": False},
        eos_token_id=2,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("sinks", "bias", "_bias")) or "norm" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    # Longer than the 8-token sliding window.
    input_ids = np.random.default_rng(SEED).integers(3, vocab, size=(2, 24)).astype(np.int32)

    out = family / "hf-float"
    model.save_pretrained(out)
    write_layout(out, hf_reference(model, input_ids), tokenizer_dir)

    # The official layout: MXFP4 expert blocks and E8M0 scales, everything else float.
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    packed: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for layer in range(config.num_hidden_layers):
            p = f"model.layers.{layer}.mlp.experts"
            for name in ("gate_up_proj", "down_proj"):
                linear = mx.array(state.pop(f"{p}.{name}")).swapaxes(1, 2)  # [E, out, in]
                q, scales = mx.quantize(linear, group_size=32, bits=4, mode="mxfp4")
                blocks = np.array(q.view(mx.uint8)).reshape(*q.shape[:2], -1, 16)
                packed[f"{p}.{name}_blocks"] = blocks
                packed[f"{p}.{name}_scales"] = np.array(scales)
                back = mx.dequantize(q, scales, group_size=32, bits=4, mode="mxfp4").astype(
                    mx.float32
                )
                getattr(model.model.layers[layer].mlp.experts, name).copy_(
                    torch.from_numpy(np.array(back.swapaxes(1, 2))))  # fmt: skip
    state.update(packed)
    out = family / "mxfp4"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    raw = json.loads((family / "hf-float" / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["attn", "router", "embed", "lm_head"],
    }
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    write_layout(out, hf_reference(model, input_ids), tokenizer_dir)

    from mlx_lm import convert

    with tempfile.TemporaryDirectory() as tmp:
        # mlx-community's "MXFP4-Q8": experts stay MXFP4, the rest at 8-bit affine.
        source = Path(tmp) / "source"
        shutil.copytree(out, source)
        raw = json.loads((source / "config.json").read_text())
        rope = raw.pop("rope_parameters")
        raw["rope_theta"] = rope.pop("rope_theta")
        raw["rope_scaling"] = rope
        (source / "config.json").write_text(json.dumps(raw, indent=2))
        (source / "reference.npz").unlink()
        q8 = family / "mlx-mxfp4-q8"
        convert(str(source), str(q8), quantize=True, q_bits=8, q_group_size=64)
        (q8 / "README.md").unlink(missing_ok=True)
        write_layout(q8, mlx_reference(q8, input_ids), tokenizer_dir)


def make_gemma4(tokenizer_dir: Path) -> None:
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    family = FIXTURES / "gemma4"
    shutil.rmtree(family, ignore_errors=True)
    family.mkdir(parents=True)
    vocab = 512
    torch.manual_seed(SEED)
    config = Gemma4TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=64,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0, final_logit_softcapping=30.0,
        max_position_embeddings=512, initializer_range=0.08, tie_word_embeddings=True,
        eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = Gemma4ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    perturb_unit_params(model, generator)
    perturb_layer_scalars(model, generator)
    # Longer than the 6-token sliding window.
    input_ids = np.random.default_rng(SEED).integers(3, vocab, size=(2, 20)).astype(np.int32)
    out = family / "hf"
    model.save_pretrained(out)
    write_layout(out, hf_reference(model, input_ids), tokenizer_dir)

    # The official layout: the multimodal wrapper (``model.language_model.*``, a vision tower).
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(SEED)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
              "patch_size": 4, "position_embedding_size": 64}  # fmt: skip
    wrapper_config = Gemma4Config(text_config=config.to_dict(), vision_config=vision,
                                  audio_config=None)  # fmt: skip
    wrapper_config.text_config._attn_implementation = "eager"
    wrapper = Gemma4ForConditionalGeneration(wrapper_config).eval()
    wrapper.model.language_model.load_state_dict(model.model.state_dict())
    wrapper.lm_head.load_state_dict(model.lm_head.state_dict())
    out = family / "hf-wrapper"
    wrapper.save_pretrained(out)
    write_layout(out, hf_reference(wrapper, input_ids), tokenizer_dir)

    from mlx_lm import convert

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        shutil.copytree(out, source)
        (source / "reference.npz").unlink()
        raw = json.loads((source / "config.json").read_text())
        raw["vocab_size"] = vocab  # mlx-lm reads the vocabulary size from the top level
        # ... and the global attention shape as hub configs spell it, not per_layer_config.
        raw["text_config"]["global_head_dim"] = 32
        raw["text_config"]["num_global_key_value_heads"] = 1
        (source / "config.json").write_text(json.dumps(raw, indent=2))
        q4 = family / "mlx-q4"
        convert(str(source), str(q4), quantize=True, q_bits=4, q_group_size=64)
        (q4 / "README.md").unlink(missing_ok=True)
        write_layout(q4, mlx_reference(q4, input_ids), tokenizer_dir)


def record_versions(family: str) -> None:
    import mlx.core as mx
    import mlx_lm
    import tokenizers
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mlx": mx.__version__,
        "mlx-lm": mlx_lm.__version__,
        "tokenizers": tokenizers.__version__,
        "seed": SEED,
        "command": f"python tools/make_fixtures.py {family}",
    }
    (FIXTURES / family / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")


def make_deepseek_v4(tokenizer_dir: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import fixtures_deepseek_v4

    fixtures_deepseek_v4.make(FIXTURES, tokenizer_dir, write_layout)


FAMILIES = {
    "qwen3_moe": make_qwen3_moe,
    "deepseek_v4": make_deepseek_v4,
    "qwen3_5_moe": make_qwen3_5_moe,
    "gpt_oss": make_gpt_oss,
    "gemma4": make_gemma4,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=sorted(FAMILIES), choices=sorted(FAMILIES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        build_tokenizer(500, tokenizer_dir)
        for family in args.families:
            print(f"{family}:")
            FAMILIES[family](tokenizer_dir)
            record_versions(family)
    return 0


if __name__ == "__main__":
    sys.exit(main())
