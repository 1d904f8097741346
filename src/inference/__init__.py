"""Using a trained checkpoint on its own: safe loading, evaluation, prediction, export."""
