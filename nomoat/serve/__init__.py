"""Serving: an OpenAI-compatible HTTP server with continuous batching and a chat page (`nomoat serve MODEL`).

engine.py batches and samples (torch only); app.py speaks HTTP (FastAPI, imported only here, never by
`import nomoat`); metrics.py writes Prometheus text; page.html is the chat page, one static file.
"""
