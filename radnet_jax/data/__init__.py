"""Input pipelines: grain pretraining input, segmentation patches, augmentation."""
