"""`localchat serve`: the store's models over an OpenAI-compatible HTTP API (extra `serve`)."""
