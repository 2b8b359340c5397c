"""Names the config accepts for settings the engine acts on, defined below both (foundation layer).

:mod:`finetune.config` checks a config against them and :mod:`finetune.data.formats` implements them: the config
never imports the engine, so reading a config file stays fast and torch-free.
"""

# How a data file's records are laid out; "auto" detects it from the first record's columns.
FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "text", "preference")
# What happens to an example longer than max_seq_len.
OVERLONG = ("truncate", "error")
