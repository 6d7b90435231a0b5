"""`mllmseg` subcommands, one module per family (see mllmseg.cli)."""
