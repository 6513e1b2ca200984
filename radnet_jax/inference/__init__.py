"""Using trained networks: sliding-window inference (load / predict / embed live in radnet_jax.api)."""
