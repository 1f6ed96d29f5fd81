"""An emulated LSF for testing cluster profiles: see lsf.py."""
