"""Chat templates: the model's own (sandboxed) or a named fallback from the registry."""

from .registry import CHAT_FORMATS, DEFAULT_FORMAT, ChatFormat, UnknownChatFormat, get_format
from .sandbox import TemplateError, TemplateSecurityError, render_chat

__all__ = ["CHAT_FORMATS", "DEFAULT_FORMAT", "ChatFormat", "TemplateError", "TemplateSecurityError",
           "UnknownChatFormat", "get_format", "render_chat"]
