"""Backbones and their weights, the classification head, and the LightningModule."""
