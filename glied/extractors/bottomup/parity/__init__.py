"""Parity material for the bottom-up detector: the random reference checkpoint generator (vendored, see
make_random_ckpt.py) and the stage-wise comparison harness."""
