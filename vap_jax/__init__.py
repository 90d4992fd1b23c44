"""vap_jax: Video-As-Prompt in JAX/Flax."""
