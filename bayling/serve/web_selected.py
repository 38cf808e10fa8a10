"""The message a visitor clicked in the chat: its raw text, its earlier versions, and deleting its turn.

Some answers (e.g. "1. 1. 1. 2.") are mangled by Markdown; the raw view shows exactly what the
model wrote. Retry keeps every earlier version of an answer, and ◀ / ▶ here switch between them.
"""
from __future__ import annotations

from typing import Optional

import gradio as gr

from .web_service import ChatService, key_of
from .web_state import Session, message_at, render_chat

BUSY = "An answer is still coming: press Stop first."


def _describe(session: Session, index: Optional[int]) -> tuple[str, str]:
    """(what is selected, its raw text)."""
    if index is None or index >= len(session.messages):
        return "Click a message in the chat to see its raw text, its versions, or to delete it.", ""
    m = session.messages[index]
    if m["role"] == "user":
        return f"Message {index + 1}, yours.", m.get("shown", m["content"])
    versions = len(m.get("versions") or [0])
    return f"Answer {index + 1}, version {m.get('current', 0) + 1} of {versions}.", m["content"]


def show_version(message: dict, step: int) -> bool:
    """Move an answer to its previous (-1) or next (+1) version; False when there is none."""
    versions = message.get("versions") or []
    k = message.get("current", len(versions) - 1) + step
    if not 0 <= k < len(versions):
        return False
    message["current"] = k
    message["content"], message["stats"] = versions[k]["content"], versions[k].get("stats") or {}
    return True


def delete_turn(session: Session, index: int) -> None:
    """Delete the question at index (or the question of the answer at index) with its answer."""
    start = index if session.messages[index]["role"] == "user" else max(index - 1, 0)
    if session.messages[start]["role"] != "user":
        start = index
    end = start + 1
    while end < len(session.messages) and session.messages[end]["role"] == "assistant":
        end += 1
    del session.messages[start:end]


def build_selected_panel(service: ChatService, panel: str, session, chatbot) -> list:
    """Lay out the panel under the chat and wire it; returns the events after which the chat changed."""
    selected = gr.State(None)
    with gr.Accordion("Selected message: raw text, versions, delete", open=False, elem_id=f"{panel}-selected"):
        info = gr.Markdown(_describe(Session(), None)[0], elem_id=f"{panel}-selected-info")
        with gr.Row():
            older = gr.Button("◀ Older version", size="sm", elem_id=f"{panel}-older")
            newer = gr.Button("Newer version ▶", size="sm", elem_id=f"{panel}-newer")
            remove = gr.Button("Delete this turn", size="sm", variant="stop", elem_id=f"{panel}-delete-turn")
        raw = gr.Textbox(label="Raw text", lines=4, max_lines=20, interactive=False, buttons=["copy"],
                         elem_id=f"{panel}-raw")

    def on_select(data: gr.SelectData, session: Session):
        index = message_at(session, data.index if isinstance(data.index, int) else -1)
        return (index, *_describe(session, index))

    def on_version(step: int):
        def move(request: gr.Request, session: Session, index: Optional[int]):
            if service.busy(key_of(request, panel)):
                return gr.skip(), gr.skip(), BUSY, gr.skip()
            if index is None or index >= len(session.messages) or not show_version(session.messages[index], step):
                return gr.skip(), gr.skip(), *_describe(session, index)
            return session, render_chat(session), *_describe(session, index)
        return move

    def on_delete(request: gr.Request, session: Session, index: Optional[int]):
        if service.busy(key_of(request, panel)):
            return gr.skip(), gr.skip(), gr.skip(), BUSY, gr.skip()
        if index is None or index >= len(session.messages):
            return gr.skip(), gr.skip(), None, *_describe(session, None)
        delete_turn(session, index)
        session.notice = ""
        return session, render_chat(session), None, *_describe(session, None)

    chatbot.select(on_select, session, [selected, info, raw], queue=False)
    return [older.click(on_version(-1), [session, selected], [session, chatbot, info, raw], queue=False),
            newer.click(on_version(+1), [session, selected], [session, chatbot, info, raw], queue=False),
            remove.click(on_delete, [session, selected], [session, chatbot, selected, info, raw], queue=False)]
