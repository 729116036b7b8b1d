"""Reproducible BPE vocabularies for the tiny foundations' tokenizers."""

from __future__ import annotations


def canonical_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]) -> dict[str, int]:
    """Token ids in a fixed order: special tokens, the initial symbols sorted, then one token per
    merge in merge order.

    The `tokenizers` BPE trainer learns the same merges on every run but numbers the tokens in
    hash-map order (huggingface/tokenizers#1794), so the same seed would build a different model.
    """
    merged = ["".join(pair) for pair in merges]
    symbols = sorted(set(vocab) - set(merged) - set(specials))
    return {token: i for i, token in enumerate(dict.fromkeys([*specials, *symbols, *merged]))}
