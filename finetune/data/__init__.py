"""Training data: reading records (``records``), prompt formats (``formats``, no ``datasets`` import: the
predictions server renders prompts with it), preparing and caching tokenized splits (``prepare``), and cutting
them into micro-batches (``batching``)."""
