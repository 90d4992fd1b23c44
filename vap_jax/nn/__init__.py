"""Building blocks shared by every vap_jax model."""
