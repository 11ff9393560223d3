"""SPEC stages 6-7: sliding-window prediction, the prior correction and calibration, post-processing, the segment command."""
