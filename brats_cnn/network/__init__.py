"""The network of Pereira et al. (SPEC stage 4), its fully convolutional form for inference, and checkpoints."""
