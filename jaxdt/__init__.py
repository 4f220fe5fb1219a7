"""jaxdt: dead-token dynamics in bf16, reimplemented functionally in JAX."""
