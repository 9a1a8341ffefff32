"""Usage: one row per gateway request (key, project, model, tokens, latency), written in
batches off the request path, and the aggregates behind `GET /api/v1/usage`."""
