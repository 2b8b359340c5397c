"""Models: precision by capability (``precision``), loading a base and its adapter (``load``), and exact
rewrites of the training arithmetic (``ops``)."""
