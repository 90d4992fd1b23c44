"""Command-line converters: diffusers/HF checkpoint folders -> vap_jax Orbax folders."""
