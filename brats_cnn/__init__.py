"""brats-cnn: brain tumour segmentation with the CNN of Pereira et al. (IEEE TMI 2016).

Channel order everywhere inside the project is :data:`CHANNELS` (T1, T1c, T2, FLAIR).
"""

__version__ = "0.1.0"

CHANNELS: tuple[str, ...] = ("t1", "t1c", "t2", "flair")
