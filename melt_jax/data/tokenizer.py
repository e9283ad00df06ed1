"""Tokenizers of the data pipeline: a byte-level tokenizer with no files, and Hugging Face tokenizer.json.

Both expose the same small interface (`Tokenizer`): `encode(text) -> list[int]` without special
tokens, `encode_batch(texts)`, `decode(ids) -> str`, and the attributes `eos_id`, `pad_id` and
`vocab_size`, plus `token_to_id(name)` for special tokens.

`ByteTokenizer` is the embedded default (no downloads): ids 0..255 are the UTF-8 bytes, 256 is
`<|endoftext|>` (eos) and 257 is `<|pad|>`. `HFTokenizer` reads a `tokenizer.json` with the
`tokenizers` package. `load_tokenizer("byte" | path)` picks one from a string of a run config.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import ClassVar, Protocol

import tokenizers

from melt_jax.errors import DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    """The interface the data pipeline uses."""

    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...

    def token_to_id(self, name: str) -> int: ...


# --------------------------------------------------------------------------------------------------
# Byte-level tokenizer


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then `<|endoftext|>` (256, eos) and `<|pad|>` (257, pad)."""

    num_bytes = 256
    eos_id = 256
    pad_id = 257
    vocab_size = 258
    special_tokens: ClassVar[dict[str, int]] = {EOS_TOKEN: 256, PAD_TOKEN: 257}

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` as ids; no special token is added."""
        if not isinstance(text, str):
            raise DataError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of every text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`: bytes decoded as UTF-8 (invalid sequences become U+FFFD); special tokens
        are dropped, or written by name when `skip_special_tokens` is false."""
        names = {i: name for name, i in self.special_tokens.items()}
        pieces: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < self.num_bytes:
                pending.append(i)
            elif i in names:
                if not skip_special_tokens:
                    pieces.append(pending.decode("utf-8", errors="replace"))
                    pending.clear()
                    pieces.append(names[i])
            else:
                raise DataError(f"token id {i} is outside the ByteTokenizer vocabulary [0, {self.vocab_size})")
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def token_to_id(self, name: str) -> int:
        """The id of a special token name (`<|endoftext|>` or `<|pad|>`)."""
        if name not in self.special_tokens:
            raise DataError(
                f"unknown special token {name!r} for ByteTokenizer; known: {', '.join(self.special_tokens)}"
            )
        return self.special_tokens[name]


# --------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


class HFTokenizer:
    """A Hugging Face `tokenizer.json` read with the `tokenizers` package.

    The eos token is looked up by name (`eos_token`, `<|endoftext|>` by default; chat models may use
    `<|im_end|>`). The pad id is `pad_token`'s id if given, else the pad id of the file's padding
    section, else the eos id. Padding and truncation of the file are switched off: `encode` returns
    the ids of exactly the text given, without special tokens.
    """

    def __init__(self, path: str | os.PathLike, eos_token: str = EOS_TOKEN, pad_token: str | None = None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file not found: {path}")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise DataError(f"cannot read tokenizer file {path}: {e}") from e
        self.path = path
        self.eos_token = eos_token
        self.eos_id = self._lookup(eos_token, "eos_token")
        padding = self._tokenizer.padding
        if pad_token is not None:
            self.pad_id = self._lookup(pad_token, "pad_token")
        elif padding is not None:
            self.pad_id = int(padding["pad_id"])
        else:
            self.pad_id = self.eos_id
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _lookup(self, name: str, field: str) -> int:
        token_id = self._tokenizer.token_to_id(name)
        if token_id is None:
            added = [t.content for t in self._tokenizer.get_added_tokens_decoder().values()]
            raise DataError(f"{field} {name!r} is not in the vocabulary of {self.path}; its added tokens are: {added}")
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`; no special token (BOS, EOS) is added."""
        if not isinstance(text, str):
            raise DataError(f"HFTokenizer.encode expects a str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of every text (tokenized in parallel by the Rust library)."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"HFTokenizer.encode_batch: text {i} is a {type(text).__name__}, not a str")
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`, special tokens dropped unless `skip_special_tokens` is false."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}) of {self.path}")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, name: str) -> int:
        """The id of a token name of the vocabulary."""
        return self._lookup(name, "token")


# --------------------------------------------------------------------------------------------------
# From a run config string


def load_tokenizer(spec: str, *, eos_token: str | None = None, pad_token: str | None = None) -> Tokenizer:
    """ "byte" -> ByteTokenizer; otherwise `spec` is a tokenizer.json file or a folder that holds one."""
    if spec == "byte":
        if eos_token not in (None, EOS_TOKEN) or pad_token not in (None, PAD_TOKEN):
            raise DataError("the byte tokenizer has fixed special tokens <|endoftext|> and <|pad|>")
        return ByteTokenizer()
    path = spec
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise DataError(f"tokenizer folder {spec} has no {TOKENIZER_FILE}")
    elif not os.path.exists(path):
        raise DataError(f"tokenizer not found: {spec!r} is neither 'byte' nor an existing tokenizer.json or folder")
    return HFTokenizer(path, eos_token=eos_token or EOS_TOKEN, pad_token=pad_token)
