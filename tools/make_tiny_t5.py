#!/usr/bin/env python
"""Write a tiny random Flan-T5 stand-in (encoder + tokenizer) for CPU smoke runs of the Infinity / NSARM recipes.

    python tools/make_tiny_t5.py runs/tiny_t5
"""

import sys

from arsr.testing import build_tiny_t5

if __name__ == "__main__":
    print(f"wrote {build_tiny_t5(sys.argv[1] if len(sys.argv) > 1 else 'runs/tiny_t5')}")
