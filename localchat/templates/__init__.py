"""Chat templates: the model's own (sandboxed) or a named fallback from the registry."""

from .prompt import Prompt, render_prompt
from .registry import CHAT_FORMATS, DEFAULT_FORMAT, ChatFormat, UnknownChatFormat, get_format
from .sandbox import (LIMITS, RenderLimits, TemplateError, TemplateLimitError, TemplateSecurityError,
                      render_chat)

__all__ = ["CHAT_FORMATS", "DEFAULT_FORMAT", "LIMITS", "ChatFormat", "Prompt", "RenderLimits", "TemplateError",
           "TemplateLimitError", "TemplateSecurityError", "UnknownChatFormat", "get_format", "render_chat",
           "render_prompt"]
