"""The files that travel inside checkpoints as Hugging Face remote code.

They import nothing from the rest of `mllmseg` and only each other by flat relative imports, because
transformers copies remote code into a checkpoint folder file by file.
"""
