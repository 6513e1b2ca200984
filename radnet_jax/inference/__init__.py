"""Using trained networks: load (restore + preprocessing contract), inputs, apply,
header_qa, predict, embed, segment, sliding_window. ``radnet_jax.api`` is the facade."""
