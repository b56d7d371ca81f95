"""sve: Singular Value Ensembles for pretrained transformer checkpoints."""

import logging

__version__ = "0.1.0"

# Library notices (e.g. "decomposing … into …") reach stderr unless the application configures the
# "sve" logger itself; silence them with logging.getLogger("sve").setLevel(logging.WARNING).
_logger = logging.getLogger("sve")
if not _logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("sve: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False
