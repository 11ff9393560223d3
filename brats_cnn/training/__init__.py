"""SPEC stages 3 and 5: patch sampling, the training loop, its validation and distributed setup, and the speed benchmark."""
