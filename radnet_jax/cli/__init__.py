"""Command-line entry points (argparse only): python -m radnet_jax.cli.predict, python -m radnet_jax.cli.predict_seg."""
