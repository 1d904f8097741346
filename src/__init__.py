"""Image transfer learning with PyTorch Lightning and Hydra."""
