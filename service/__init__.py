"""Inference: the torch-free model code (preprocess, features, predictor) and the FastAPI app."""
