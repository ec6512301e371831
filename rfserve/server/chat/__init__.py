"""The chat route: OpenAI Chat Completions over the served models that chat (JanusFlow), with token-level
continuous batching."""
