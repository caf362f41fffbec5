"""Inference. Two layers:

- `service.core`: the model contract shared with training (labels, image preprocessing, the
  feature encoder, metadata validation, the bundle manifest and the Predictor). Torch-free and
  FastAPI-free: training imports it, and so can any offline user of a bundle.
- `service.api`: the FastAPI app that serves a bundle over HTTP. It only wires the core to HTTP.
"""
