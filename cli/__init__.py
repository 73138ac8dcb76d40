"""The `citygw` command line: one module per verb group (`main` holds the top-level
verbs and assembles the rest; the platform's group lives with it in central/cli.py)."""
