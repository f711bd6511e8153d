"""The pieces of `python -m launch.benchmark`: measurement helpers, fixtures, one module per section."""
