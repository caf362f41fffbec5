"""The HTTP layer: a FastAPI app that serves one bundle through `service.core`.

app           create_app(): wires settings, state, middleware, error handlers and routers
settings      the one Settings object (flags or LESION_* variables)
state         ModelState: the loaded bundle, the app's only mutable state
auth          the one access policy (public paths, API key, admin key), applied by the request guard
dependencies  FastAPI dependencies: settings, state, metrics, the loaded Predictor
errors        core errors and HTTP errors -> RFC 9457 problem bodies with a code and the request id
middleware    request id, admission (in-flight requests and bytes), body limits and deadline, metrics, logs
forms         the multipart parser with per-part limits
batching      the micro-batcher: concurrent requests share one CNN run
protocol      uvicorn's own protocol errors as problems
logs          one event per line, text or JSON, control characters escaped
metrics       the Prometheus registry
schemas       response models shown in /docs
routes/       predictions (/predict, /predict/batch), operations (health, model, card, metrics, docs,
              page) and admin (bundle swap)
"""
