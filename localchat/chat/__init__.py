"""Conversations: turns, templates and context fitting, shared by CLI, UI and server."""

from .session import ChatSession, Message, resolve_template

__all__ = ["ChatSession", "Message", "resolve_template"]
