"""The default model's shipped DFlash draft: found, used by default, lossless, and useful."""

from __future__ import annotations

from typer.testing import CliRunner

from mach import load_moe
from mach.cli import _register_commands, app
from mach.decode.dflash import DFlashDrafter
from mach.decode.engine import TargetEngine
from mach.decode.params import SamplingParams
from mach.decode.select import build_engine
from mach.decode.speculative import SpecDecEngine
from mach.default_model import default_model_path

PROMPT = "def read_config(path):\n"


def test_the_default_model_decodes_with_its_draft_losslessly() -> None:
    loaded = load_moe(default_model_path())
    engine = build_engine(loaded)
    assert isinstance(engine, SpecDecEngine) and isinstance(engine.drafter, DFlashDrafter)
    tokenizer = loaded.tokenizer
    assert tokenizer is not None
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    drafted = engine.generate(prompt, params)
    plain = TargetEngine(loaded.model, tokenizer, loaded.cache.new).generate(prompt, params)
    assert drafted.tokens == plain.tokens
    # A trained draft, not a random one: some of its drafts are right.
    assert drafted.stats.accepted_tokens > 0
    assert drafted.stats.acceptance_length > 1.0


def test_generate_reports_the_drafts_acceptance_and_no_draft_turns_it_off() -> None:
    _register_commands()
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "-p", PROMPT, "-n", "24", "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert "accepted" in result.output and "tokens/pass" in result.output
    result = runner.invoke(app, ["generate", "-p", PROMPT, "-n", "24", "--temp", "0",
                                 "--no-draft"])  # fmt: skip
    assert result.exit_code == 0 and "tokens/pass" not in result.output
