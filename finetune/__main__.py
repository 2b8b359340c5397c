"""``python -m finetune``: the CLI, also what ``accelerate launch -m finetune train ...`` runs."""

import sys

from .cli import main

sys.exit(main())
