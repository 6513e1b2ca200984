"""Tasks: pretraining, segmentation transfer, liver region proposal (each a train_and_evaluate)."""
