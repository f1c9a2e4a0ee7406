"""Tokenizer and streaming detokenizer: what callers may rely on."""

import random
from pathlib import Path

import pytest
import sentencepiece as spm

from gpt_fast_mixtral.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "café, naïve, résumé, Ångström, Straße",
    "日本語のテキストと中文",
    "emoji: 🎉👍🏽 and a flag 🇫🇷",
    "  two leading spaces, a trailing one ",
    "tabs\tand\nnew lines\n\n    indented code()",
    "digits 1234567890 and symbols ~!@#$%^&*()",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tiny_tokenizer_path)


@pytest.fixture(scope="module")
def reference(tiny_tokenizer_path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))


def byte_id(reference: spm.SentencePieceProcessor, value: int) -> int:
    return reference.piece_to_id(f"<0x{value:02X}>")


def test_mistral_layout(tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 1024)
    assert reference.id_to_piece(0) == "<unk>"
    assert all(reference.is_byte(byte_id(reference, value)) for value in range(256))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text
    assert tokenizer.decode(tokenizer.encode(text)) == text  # BOS decodes to nothing


def test_characters_outside_the_vocabulary_fall_back_to_utf8_bytes(
        tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    ids = tokenizer.encode("🎉", bos=False)
    byte_ids = [token_id for token_id in ids if reference.is_byte(token_id)]
    pieces = [reference.id_to_piece(token_id) for token_id in byte_ids]
    assert pieces == ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]
    assert tokenizer.decode(ids) == "🎉"


def test_bos_is_first_only_when_asked(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello")[0] == tokenizer.bos_id
    assert tokenizer.encode("Hello")[1:] == tokenizer.encode("Hello", bos=False)
    assert tokenizer.bos_id not in tokenizer.encode("Hello", bos=False)
    assert tokenizer.encode("") == [tokenizer.bos_id]
    assert tokenizer.encode("", bos=False) == []


def test_control_tokens_decode_to_nothing(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello there", bos=False)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    assert tokenizer.decode([bos, *ids, eos]) == tokenizer.decode(ids) == "Hello there"
    assert tokenizer.decode([bos, eos], continuation=True) == ""


def test_decode_agrees_with_sentencepiece(
        tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids)
    # Any mix of ordinary pieces, <unk> and control tokens (byte pieces that form invalid UTF-8 are the
    # one documented difference, see below).
    ordinary = [token_id for token_id in range(tokenizer.vocab_size) if not reference.is_byte(token_id)]
    rng = random.Random(0)
    for _ in range(300):
        ids = rng.choices(ordinary, k=rng.randint(0, 12))
        assert tokenizer.decode(ids) == reference.decode(ids), ids


def test_invalid_utf8_becomes_replacement_characters_as_python_decodes_it(
        tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    # sentencepiece writes one U+FFFD per byte ("\ufffd\ufffd" here); we follow
    # bytes.decode(errors="replace"), which the streaming detokenizer can reproduce exactly.
    truncated = bytes([0xE6, 0x97])  # the first two of the three bytes of "日"
    ids = [byte_id(reference, value) for value in truncated]
    assert tokenizer.decode(ids) == truncated.decode("utf-8", errors="replace") == "\ufffd"


def test_continuation_keeps_the_leading_space(
        tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    ids = tokenizer.encode("Paris", bos=False)
    assert reference.id_to_piece(ids[0]).startswith("\u2581")
    assert reference.decode(ids) == tokenizer.decode(ids) == "Paris"  # sentencepiece drops it
    assert tokenizer.decode(ids, continuation=True) == " Paris"
    assert tokenizer.decode([tokenizer.bos_id, *ids]) == "Paris"  # BOS does not count as the first piece


def test_unknown_and_out_of_range_ids(tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    assert tokenizer.decode([0]) == reference.decode([0])
    for bad in (tokenizer.vocab_size, -1):
        with pytest.raises(TokenizerError, match=f"token id {bad} is outside the vocabulary"):
            tokenizer.decode([bad])


def test_accepts_the_checkpoint_directory(tiny_tokenizer_path: Path) -> None:
    assert Tokenizer(tiny_tokenizer_path.parent).vocab_size == Tokenizer(tiny_tokenizer_path).vocab_size


def test_missing_tokenizer_model_says_where_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as error:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(error.value) and "download" in str(error.value)


@pytest.mark.parametrize("content", [b"", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n"])
def test_corrupt_tokenizer_model_says_where_and_what_to_do(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="not a valid sentencepiece model") as error:
        Tokenizer(path)
    assert str(path) in str(error.value) and "download it again" in str(error.value)


def stream(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(token_id) for token_id in ids]
    pieces.append(detokenizer.flush())
    assert detokenizer.text == "".join(pieces)
    return pieces, "".join(pieces)


def random_ids(rng: random.Random, tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> list[int]:
    """Generated-looking ids: ordinary pieces, control tokens, the bytes of real multi-byte characters,
    and stray random bytes (which often make invalid UTF-8)."""
    ids: list[int] = []
    for _ in range(rng.randint(0, 30)):
        kind = rng.random()
        if kind < 0.4:
            ids.append(rng.randrange(tokenizer.vocab_size))
        elif kind < 0.5:
            ids.append(rng.choice([tokenizer.bos_id, tokenizer.eos_id, 0]))
        elif kind < 0.8:
            character = rng.choice("éß日本🎉👍🏽\u0301€")
            ids.extend(byte_id(reference, value) for value in character.encode())
        else:
            ids.append(byte_id(reference, rng.randrange(256)))
    return ids


def test_streamed_pieces_join_to_the_continuation_text(
        tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    rng = random.Random(1234)
    for _ in range(500):
        ids = random_ids(rng, tokenizer, reference)
        pieces, text = stream(tokenizer, ids)
        assert text == tokenizer.decode(ids, continuation=True), ids
        if "\ufffd" not in text:  # nothing invalid: then no piece may hold half a character
            assert all("\ufffd" not in piece for piece in pieces), (ids, pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_real_text_never_splits_a_character(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, bos=False)
    pieces, streamed = stream(tokenizer, ids)
    assert streamed == " " + text  # the dummy-prefix space is kept: this text follows a prompt
    assert all("\ufffd" not in piece for piece in pieces)


def test_multibyte_character_is_held_back_until_complete(
        tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(byte_id(reference, value)) for value in "🎉".encode()]
    assert pieces == ["", "", "", "🎉"]
    assert detokenizer.flush() == ""


def test_dangling_partial_character_is_flushed_as_one_replacement(
        tokenizer: Tokenizer, reference: spm.SentencePieceProcessor) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(byte_id(reference, 0xF0)) == ""
    assert detokenizer.push(byte_id(reference, 0x9F)) == ""
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.text == "\ufffd"


def test_first_streamed_piece_keeps_its_leading_space(tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    first = tokenizer.encode("Paris", bos=False)[0]
    assert detokenizer.push(first).startswith(" ")


def test_text_with_a_lone_surrogate_is_refused_with_a_clear_error(tiny_tokenizer_path):
    with pytest.raises(TokenizerError, match="not valid Unicode at character 1"):
        Tokenizer(tiny_tokenizer_path).encode("x\ud800")
