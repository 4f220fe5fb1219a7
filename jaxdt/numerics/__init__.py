"""Numerics shared by the jitted step and the host: bf16 lattice, ordered sums, precision, backend."""
