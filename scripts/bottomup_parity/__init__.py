"""Parity material for the bottom-up detector: the random reference checkpoint generator (vendored, see
make_random_ckpt.py) and the stage-wise comparison harness. Test-support code kept outside the installed
package; import it as ``scripts.bottomup_parity`` with the repository root on ``sys.path``."""
