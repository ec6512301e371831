"""The chat route: OpenAI Chat Completions over JanusFlow, with token-level continuous batching."""

# The families whose models chat; the others only make images.
CHAT_FAMILIES = ("janusflow",)
