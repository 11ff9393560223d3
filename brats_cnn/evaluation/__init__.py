"""SPEC stage 8: BraTS metrics (legacy and lesion-wise), the evaluate and compare commands, and their reports."""
