"""Rebuild the tiny offline Qwen2-VL tokenizer fixture in tests/assets/tiny_qwen2vl_tokenizer/.

    python tools/build_test_tokenizer.py [--out DIR] [--vocab-size N]

Deterministic: the same versions of `tokenizers` / `transformers` give the same files.
"""

from __future__ import annotations

import argparse
import os

from megatron_vrft.data.tokenizer import build_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "assets", "tiny_qwen2vl_tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=3000)
    args = parser.parse_args()
    tok = build_tiny_tokenizer(args.out, vocab_size=args.vocab_size)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: vocab {len(tok)}, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
