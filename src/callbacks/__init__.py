"""Trainer callbacks: backbone freezing, epoch history and summaries."""
