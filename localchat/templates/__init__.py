"""Chat templates: the model's own (sandboxed) or a named fallback from the registry."""

from .registry import CHAT_FORMATS, DEFAULT_FORMAT, ChatFormat, UnknownChatFormat, get_format
from .sandbox import (LIMITS, RenderLimits, TemplateError, TemplateLimitError, TemplateSecurityError,
                      render_chat)

__all__ = ["CHAT_FORMATS", "DEFAULT_FORMAT", "LIMITS", "ChatFormat", "RenderLimits", "TemplateError",
           "TemplateLimitError", "TemplateSecurityError", "UnknownChatFormat", "get_format", "render_chat"]
