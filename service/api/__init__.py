"""The HTTP layer: a FastAPI app that serves one bundle through `service.core`.

app           create_app(): wires settings, state, middleware, error handlers and routers
settings      the one Settings object (flags or LESION_* variables)
state         ModelState: the loaded bundle, the app's only mutable state
dependencies  FastAPI dependencies: settings, the loaded Predictor, the API key check
errors        core errors and HTTP errors -> JSON error bodies with the request id
middleware    request id, body-size guard, Prometheus metrics, one log line per request
metrics       the Prometheus registry
schemas       response models shown in /docs
routes/       predictions (/predict, /predict/batch) and operations (health, model, metrics, docs, page)
"""
