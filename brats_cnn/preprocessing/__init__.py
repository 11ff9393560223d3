"""SPEC stages 1-2: N4 bias correction, Nyul standardisation (or z-scores), and the preprocessed-case cache."""
