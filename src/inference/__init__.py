"""Using a trained checkpoint on its own: safe loading, evaluation, prediction, export."""

from src.inference.classifier import Classifier

__all__ = ["Classifier"]
