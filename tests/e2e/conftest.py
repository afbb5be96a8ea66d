import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI entry points configure the "zerotrain" logger; give later tests theirs back."""
    logger = logging.getLogger("zerotrain")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
