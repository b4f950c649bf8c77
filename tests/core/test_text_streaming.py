"""Stop strings, the streaming detokenizer and the tokenizer wrapper."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mach.decode.stopping import StopMatcher
from mach.tokenizer.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer

FIXTURE = Path(__file__).parents[1] / "fixtures" / "qwen3_moe" / "hf-per-expert"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = load_tokenizer(FIXTURE)
    assert tok is not None
    return tok


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    return "".join(matcher.feed(p) for p in pieces) + matcher.flush()


def test_stop_string_split_across_deltas_is_never_emitted() -> None:
    matcher = StopMatcher(["</answer>"])
    out = feed_all(matcher, ["The result is 4", "</ans", "wer> and more"])
    assert out == "The result is 4" and matcher.stopped


def test_partial_match_that_fails_is_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ST") == ""
    assert matcher.feed("ART") == "START"
    assert not matcher.stopped


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["\n\n", "###"])
    assert feed_all(matcher, ["a###b\n\nc"]) == "a"


def test_held_text_is_flushed_at_the_end() -> None:
    matcher = StopMatcher(["END"])
    assert feed_all(matcher, ["the E"]) == "the E"


def test_streamed_text_equals_a_full_decode(tokenizer: Tokenizer) -> None:
    text = "naïve café — 東京 🚀 def f(x):\n    return x ** 2  # ✓"
    ids = tokenizer.encode(text)
    detok = tokenizer.detokenizer()
    deltas = [detok.add_token(t) for t in ids]
    deltas.append(detok.finalize())
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_waits_for_all_its_bytes(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🚀")
    assert len(ids) > 1, "the emoji should span several byte tokens in this small vocabulary"
    detok = tokenizer.detokenizer()
    deltas = [detok.add_token(t) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🚀"


@pytest.mark.parametrize("special", [True, False])
def test_long_text_encodes_as_short_text_does(tokenizer: Tokenizer, special: bool) -> None:
    from mach.tokenizer.tokenizer import LONG_TEXT

    text = "<|im_start|>user\ndef f(x):\n    return x + 1\n" * (LONG_TEXT // 20)
    assert len(text) >= LONG_TEXT
    whole = list(tokenizer.backend.encode(text, add_special_tokens=special).ids)
    assert tokenizer.encode(text, add_special_tokens=special) == whole


def test_chat_template_and_eos(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.token_id("<|im_end|>") in tokenizer.eos_token_ids
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == tokenizer.token_id("<|im_start|>")


def test_config_eos_ids_are_merged(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((FIXTURE / "tokenizer.json").read_bytes())
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7, 9]}')
    tok = load_tokenizer(tmp_path, {"eos_token_id": 11})
    assert tok is not None and {7, 9, 11} <= tok.eos_token_ids


def test_missing_template_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((FIXTURE / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok is not None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_that_raises_is_reported(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((FIXTURE / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    tok = load_tokenizer(tmp_path)
    assert tok is not None
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_corrupt_tokenizer_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    from mach.errors import CorruptCheckpointError

    with warnings.catch_warnings(), pytest.raises(CorruptCheckpointError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
