"""Evaluation of frozen backbones: features, linear probe, kNN, fine-tuning."""
