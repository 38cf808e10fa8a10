"""The sidebar: the chat's conversations, kept in the visitor's browser (gr.BrowserState), never on the server.

New chat, switch, rename, delete, export (JSON and Markdown) and import. Each handler takes the
stored value and the conversation on screen, and hands back both.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from .web_service import ChatService, key_of
from .web_state import CHAT, Session, error_note, render_chat
from .web_store import (delete, export_json, export_markdown, find, import_json, normalise_store, put, rename,
                        sidebar_choices)

SETTING_NAMES = ("model", "system", "temperature", "top_p", "max_new_tokens")
WIDE_PX = 768  # narrower screens (phones): the sidebar and the settings start folded away
BUSY = "An answer is still coming: press Stop first."


def _list(store: dict, current: Optional[str]) -> gr.Radio:
    return gr.Radio(choices=sidebar_choices(store), value=current if find(store, current) else None)


@dataclass
class Sidebar:
    box: Any
    list: Any
    save: Any
    restore: Any
    new_chat_fn: Any


def build_sidebar(service: ChatService, store, session) -> Sidebar:
    """Lay the sidebar out and wire it; the returned handlers let the page save after each answer."""
    with gr.Sidebar(label="Conversations", open=False, elem_id="sidebar") as box:
        new_chat = gr.Button("New chat", variant="primary", size="sm", elem_id="new-chat")
        conversations = gr.Radio(choices=[], label="Conversations", elem_id="conversations")
        with gr.Row(equal_height=True):
            title = gr.Textbox(show_label=False, placeholder="New title", scale=3, elem_id="chat-title")
            rename_button = gr.Button("Rename", size="sm", scale=1, min_width=60, elem_id="rename-chat")
        delete_button = gr.Button("Delete this chat", variant="stop", size="sm", elem_id="delete-chat")
        export_button = gr.Button("Export all (JSON + Markdown)", size="sm", elem_id="export-chats")
        files = gr.File(label="Exported", file_count="multiple", visible=False, elem_id="export-files",
                        interactive=False)
        upload = gr.UploadButton("Import JSON", file_types=[".json"], size="sm", elem_id="import-chats")
        note = gr.Markdown(elem_id="sidebar-note")
    def save(session: Session, value: Any, *settings: Any):
        """Keep the conversation on screen and the settings in the browser; redraw the list."""
        s = normalise_store(value)
        s["settings"] = dict(zip(SETTING_NAMES, settings))
        put(s, session.to_stored())
        return s, _list(s, session.id)

    def restore(value: Any, width: Any):
        """On load: the conversation last on screen, its list and the settings, as they were."""
        s = normalise_store(value)
        conv = find(s, s.get("current"))
        session = Session.from_stored(conv) if conv else Session()
        settings = s.get("settings") or {}
        values = [gr.Dropdown(value=settings["model"], choices=[settings["model"]]) if settings.get("model")
                  else gr.skip()]
        values += [settings[n] if settings.get(n) is not None else gr.skip() for n in SETTING_NAMES[1:]]
        wide = isinstance(width, (int, float)) and width > WIDE_PX
        return (session, render_chat(session), s, _list(s, session.id), *values,
                gr.Sidebar(open=wide), gr.Accordion(open=wide))

    def new_chat_fn(session: Session, value: Any):
        s = normalise_store(value)
        if session.messages:
            put(s, session.to_stored())
        s["current"] = None
        fresh = Session()
        return fresh, [], s, _list(s, None)

    def on_new(request: gr.Request, session: Session, value: Any):
        if service.busy(key_of(request, CHAT)):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), BUSY
        return *new_chat_fn(session, value), ""

    def on_switch(request: gr.Request, cid: str, session: Session, value: Any):
        s = normalise_store(value)
        if service.busy(key_of(request, CHAT)):
            return gr.skip(), gr.skip(), gr.skip(), _list(s, session.id), BUSY
        if session.messages:
            put(s, session.to_stored())
        conv = find(s, cid)
        if conv is None:
            return gr.skip(), gr.skip(), s, _list(s, session.id), "That conversation is gone."
        s["current"] = cid
        chosen = Session.from_stored(conv)
        return chosen, render_chat(chosen), s, _list(s, cid), ""

    def on_rename(session: Session, value: Any, new_title: str):
        s = normalise_store(value)
        if session.messages:
            put(s, session.to_stored())
        try:
            rename(s, session.id, new_title)
        except ValueError as e:
            return gr.skip(), gr.skip(), gr.skip(), error_note(str(e))
        session.title, session.renamed = s["conversations"][session.id]["title"], True
        return session, s, _list(s, session.id), ""

    def on_delete(request: gr.Request, session: Session, value: Any):
        if service.busy(key_of(request, CHAT)):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), BUSY
        s = delete(normalise_store(value), session.id)
        fresh = Session()
        return fresh, [], s, _list(s, None), ""

    def on_export(session: Session, value: Any):
        s = normalise_store(value)
        if session.messages:
            put(s, session.to_stored())
        folder = Path(tempfile.mkdtemp(prefix="bayling-export-"))
        stamp = time.strftime("%Y-%m-%d-%H%M%S")
        json_path, md_path = folder / f"bayling-chats-{stamp}.json", folder / f"bayling-chats-{stamp}.md"
        json_path.write_text(export_json(s), encoding="utf-8")
        md_path.write_text(export_markdown(s), encoding="utf-8")
        return gr.File(value=[str(json_path), str(md_path)], visible=True), s

    def on_import(request: gr.Request, upload: Any, session: Session, value: Any):
        s = normalise_store(value)
        path = upload if isinstance(upload, str) else getattr(upload, "name", None)
        try:
            text = Path(path).read_text(encoding="utf-8")
            s, count = import_json(s, text)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), error_note(f"nothing imported: {e}")
        if service.busy(key_of(request, CHAT)):
            return gr.skip(), gr.skip(), s, _list(s, session.id), f"Imported {count} conversation(s)."
        conv = find(s, s["current"])
        chosen = Session.from_stored(conv) if conv else session
        return chosen, render_chat(chosen), s, _list(s, chosen.id), f"Imported {count} conversation(s)."

    outputs = lambda chatbot: [session, chatbot, store, conversations, note]  # noqa: E731

    def wire(chatbot) -> None:
        new_chat.click(on_new, [session, store], outputs(chatbot), queue=False)
        conversations.input(on_switch, [conversations, session, store], outputs(chatbot), queue=False)
        delete_button.click(on_delete, [session, store], outputs(chatbot), queue=False)
        upload.upload(on_import, [upload, session, store], outputs(chatbot))
        rename_button.click(on_rename, [session, store, title], [session, store, conversations, note], queue=False)
        title.submit(on_rename, [session, store, title], [session, store, conversations, note], queue=False)
        export_button.click(on_export, [session, store], [files, store])

    sidebar = Sidebar(box=box, list=conversations, save=save, restore=restore, new_chat_fn=new_chat_fn)
    sidebar.wire = wire
    return sidebar
