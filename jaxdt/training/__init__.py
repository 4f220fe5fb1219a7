"""Training: the probes (`probes`), the pure jitted step (`step`), the host loop (`loop`)."""
