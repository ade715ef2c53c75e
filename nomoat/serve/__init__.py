"""Serving: an OpenAI-compatible HTTP server with continuous batching and a chat page (`nomoat serve MODEL`).

engine.py batches and samples (torch only); protocol.py is OpenAI's wire format (pydantic, plain dicts);
guard.py checks the key and body size in front of the app; app.py holds `ServeConfig`, the routes, `build_app`
and `serve` (FastAPI, imported only there, never by `import nomoat`); metrics.py writes Prometheus text; page.html
is the chat page, one static file. Loading the model is not here: `serve` takes one already loaded.
"""
