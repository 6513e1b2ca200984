"""Training machinery shared by every task: the trainer, checkpoints, distribution, transfer, losses, metrics."""
