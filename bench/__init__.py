"""Benchmarks of the bastion against OpenSSH on one machine (``python -m bench.run``)."""
