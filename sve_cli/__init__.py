"""sve: Singular Value Ensembles for pretrained transformer checkpoints.

The library logs its notices (e.g. "decomposing … into …") to the "sve" logger and installs no handler:
the `sve` command line shows them as `sve: …` lines on stderr; a program using the library decides itself.
"""

__version__ = "0.1.0"
