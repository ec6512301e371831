"""The chat route: OpenAI Chat Completions over JanusFlow, with token-level continuous batching."""
from server.chat.routes import chat_router

__all__ = ["chat_router"]
