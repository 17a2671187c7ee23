"""The ``detoxrl`` subcommands: one module each, registered by ``detoxrl.cli``.

Each module parses its arguments and calls the Python API of the packages below it (config,
data, models, evaluation, rl, supervised, demo); none holds logic of its own beyond
printing. Imported only by ``detoxrl.cli``.
"""
