"""brats-cnn: brain tumour segmentation with the CNN of Pereira et al. (IEEE TMI 2016).

Channel order everywhere inside the project is :data:`CHANNELS` (T1, T1c, T2, FLAIR).
"""

__version__ = "0.1.0"

CHANNELS: tuple[str, ...] = ("t1", "t1c", "t2", "flair")


def progress_wanted() -> bool:
    """Progress bars only on a terminal and with INFO logs on (not under ``-q``, not into log files)."""
    import logging
    import sys

    return sys.stderr.isatty() and logging.getLogger(__name__).isEnabledFor(logging.INFO)
