"""SentencePiece tokenizer (Mistral/Mixtral `tokenizer.model`) and streaming detokenization.

Decoding goes through an id -> bytes table built once, so that text can be produced a token at a time
without re-decoding the whole sequence and without ever splitting a multi-byte UTF-8 character.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

_SPACE_SYMBOL = "\u2581"  # "▁": sentencepiece's stand-in for a space inside pieces
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(ValueError):
    """The tokenizer file cannot be used, or an id is not in its vocabulary."""


class Tokenizer:
    """A byte-fallback BPE sentencepiece model: `<unk>`=0, `<s>`=1, `</s>`=2 in Mistral's layout."""

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {path} not found: Mixtral checkpoints ship a sentencepiece "
                "`tokenizer.model`; download the full repo with scripts/download.py (or create a tiny one "
                "with scripts/make_tiny_model.py) and keep it next to the checkpoint")
        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as error:
            raise TokenizerError(
                f"{path} is not a valid sentencepiece model ({error}); it may be truncated or a Git LFS "
                "pointer: download it again with scripts/download.py") from error
        self._piece_bytes, self._strip_first = self._build_tables()

    def _build_tables(self) -> tuple[list[bytes], list[bool]]:
        sp = self._sp
        strips = _strips_first_space(sp)
        pieces: list[bytes] = []
        strippable: list[bool] = []
        for token_id in range(sp.vocab_size()):
            piece = sp.id_to_piece(token_id)
            byte_match = _BYTE_PIECE.fullmatch(piece) if sp.is_byte(token_id) else None
            if sp.is_control(token_id):
                surface = b""
            elif sp.is_unknown(token_id):
                surface = sp.decode([token_id]).encode()  # the model's unk surface, " ⁇ " by default
            elif byte_match:
                surface = bytes([int(byte_match.group(1), 16)])
            else:
                surface = piece.replace(_SPACE_SYMBOL, " ").encode()
            pieces.append(surface)
            strippable.append(strips and byte_match is None and not sp.is_unknown(token_id)
                              and piece.startswith(_SPACE_SYMBOL))
        return pieces, strippable

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first unless `bos=False` (e.g. for stop strings)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # lone surrogates ("\ud800") are valid JSON but not text
            raise TokenizerError(
                f"the text is not valid Unicode at character {error.start} ({error.reason}); send UTF-8 text") from None
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def piece_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token contributes to a continuation (b'' for BOS/EOS)."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self._piece_bytes):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._piece_bytes[token_id]

    def decode(self, ids: Sequence[int], *, continuation: bool = False) -> str:
        """Text of `ids`; as sentencepiece decodes them, or, with `continuation=True`, keeping the
        leading space of the first piece because the text follows a prompt."""
        raw = [self.piece_bytes(token_id) for token_id in ids]
        if not continuation:
            for index, token_id in enumerate(ids):
                if raw[index]:  # the first visible piece loses the space encode's dummy prefix added
                    if self._strip_first[int(token_id)]:
                        raw[index] = raw[index][1:]
                    break
        return b"".join(raw).decode("utf-8", errors="replace")


def _strips_first_space(sp: spm.SentencePieceProcessor) -> bool:
    # sentencepiece drops the "▁" of the first visible piece when the model adds a dummy prefix on
    # encode; ask it directly rather than parsing the model proto (which would need protobuf).
    for token_id in range(sp.vocab_size()):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_byte(token_id):
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith(_SPACE_SYMBOL):
            return sp.decode([token_id]) == piece.replace(_SPACE_SYMBOL, " ")[1:]
    return False


class IncrementalDetokenizer:
    """Turns generated ids into text pieces as they arrive, never splitting a UTF-8 character.

    The pieces (plus `flush()`) join to exactly `tokenizer.decode(ids, continuation=True)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # Holds back the bytes of an incomplete character until the rest arrives (or proves invalid).
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completed ('' while a character is still incomplete)."""
        piece = self._decoder.decode(self._tokenizer.piece_bytes(token_id))
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """End of generation: return what was held back (a dangling partial character becomes U+FFFD)."""
        piece = self._decoder.decode(b"", final=True)
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)
