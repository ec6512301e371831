"""The chat route: OpenAI Chat Completions over JanusFlow, with token-level continuous batching."""
from server.chat.routes import CHAT_FAMILIES, chat_router

__all__ = ["CHAT_FAMILIES", "chat_router"]
