"""Hydra configs of the command line, shipped inside the package (pkg://attnbench.conf)."""
