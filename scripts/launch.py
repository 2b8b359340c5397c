#!/usr/bin/env python
"""``python scripts/launch.py ...``: the same as ``python -m finetune.launch ...`` (see :mod:`finetune.launch`)."""

import sys

from finetune.launch import main

if __name__ == "__main__":
    sys.exit(main())
