"""The base model's own token embeddings (`token_embd.weight`) read straight from a GGUF, for the answer judge.

gguf's GGUFReader parses every metadata array into numpy views (10 s on SmolLM2's 49k-token vocabulary), so
this reads the header itself: skips the metadata, finds the tensor's offset, memory-maps its rows and
dequantizes only the rows of tokens it meets (cached). Tokens come from llama.cpp (a vocab-only model)."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import numpy as np

from avgguf.errors import AvggufError

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
TENSOR = "token_embd.weight"


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", "replace")

    def skip_value(self, vtype: int):
        """Skips one metadata value; returns it when it is a u32 (general.alignment)."""
        if vtype == STRING:
            self.string()
        elif vtype == ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALAR:
                self.pos += _SCALAR[etype] * count
            else:
                for _ in range(count):
                    self.skip_value(etype)
        elif vtype == 4:
            return self.take("I")
        else:
            self.pos += _SCALAR[vtype]
        return None


def locate(path: Path, name: str = TENSOR) -> tuple[int, int, tuple[int, ...]]:
    """(absolute byte offset, ggml type, dims) of tensor `name` in the GGUF at `path`."""
    with open(path, "rb") as f:
        head = f.read(64 << 20)  # metadata and tensor infos of any model we embed fit in 64 MiB
    cur = _Cursor(memoryview(head))
    if head[:4] != b"GGUF":
        raise AvggufError(f"{path}: not a GGUF file")
    cur.pos = 4
    cur.take("I")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    alignment = 32
    for _ in range(n_kv):
        key, vtype = cur.string(), cur.take("I")
        value = cur.skip_value(vtype)
        if key == "general.alignment" and value:
            alignment = value
    found = None
    for _ in range(n_tensors):
        tname, ndim = cur.string(), cur.take("I")
        dims = tuple(cur.take("Q") for _ in range(ndim))
        ttype, offset = cur.take("I"), cur.take("Q")
        if tname == name:
            found = (offset, ttype, dims)
    if found is None:
        raise AvggufError(f"{path}: no tensor {name!r}")
    start = -(-cur.pos // alignment) * alignment
    return start + found[0], found[1], found[2]


class TokenEmbeddings:
    """Rows of `token_embd.weight` by token id, dequantized on demand; `mean(text)` pools a text's tokens."""

    def __init__(self, path: str | Path):
        import gguf
        from llama_cpp import Llama

        self.path = Path(path)
        offset, ttype, dims = locate(self.path)
        self.qtype = gguf.GGMLQuantizationType(ttype)
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        self.n_embd, n_vocab = dims[0], dims[1]
        row_bytes = self.n_embd // block * size
        self.raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(n_vocab, row_bytes))
        self.vocab = Llama(str(self.path), vocab_only=True, verbose=False)
        self._rows: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def tokens(self, text: str) -> list[int]:
        with self._lock:
            return self.vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def rows(self, ids: list[int]) -> np.ndarray:
        from gguf.quants import dequantize

        with self._lock:
            missing = sorted({i for i in ids if i not in self._rows})
            if missing:
                for i, row in zip(missing, dequantize(np.asarray(self.raw[missing]), self.qtype).reshape(len(missing), -1)):
                    self._rows[i] = row.astype(np.float32)
            return np.stack([self._rows[i] for i in ids]) if ids else np.zeros((0, self.n_embd), np.float32)

    def mean(self, text: str) -> np.ndarray:
        ids = self.tokens(text)
        return self.rows(ids).mean(axis=0) if ids else np.zeros(self.n_embd, np.float32)


_DEFAULT: list[TokenEmbeddings] = []
_DEFAULT_LOCK = threading.Lock()


def default_table() -> TokenEmbeddings:
    """The embedded SmolLM2-135M's token embeddings (loaded once)."""
    from avgguf.config.builtin import builtin_path

    with _DEFAULT_LOCK:
        if not _DEFAULT:
            _DEFAULT.append(TokenEmbeddings(builtin_path()))
        return _DEFAULT[0]
