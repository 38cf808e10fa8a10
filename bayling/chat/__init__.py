"""Terminal chat: a loop over a Conversation, with three displays (simple, rich, programmatic)."""
from .io import ChatIO, ProgrammaticChatIO, RichChatIO, SimpleChatIO, make_chatio
from .loop import ChatSession, chat_loop

__all__ = ["ChatIO", "SimpleChatIO", "RichChatIO", "ProgrammaticChatIO", "make_chatio", "ChatSession",
           "chat_loop"]
