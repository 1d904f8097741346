"""Datasets on disk → transformed tensors: the DataModule, transforms, image decoding, dataset sources."""
