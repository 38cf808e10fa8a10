"""Conversations kept in the visitor's browser: their JSON shape, the list in the sidebar, export and import.

Nothing here touches Gradio or the network. A conversation is a plain JSON-able dict (what
gr.BrowserState stores); `Session` in web_state.py is the working copy of the one on screen.

Messages, as stored:
    {"role": "user", "content": what the model is sent, "shown"?: what the bubble shows,
     "failed"?: why it could not be answered (such a message is never sent again)}
    {"role": "assistant", "content": the version on screen, "stats": its stats,
     "versions": [{"content", "stats", "vote"?, "comment"?}, ...], "current": index into versions}
"""
from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, Optional

FORMAT = "bayling-conversations"
FORMAT_VERSION = 1
TITLE_CHARS = 48
UNTITLED = "New chat"
MAX_IMPORT_BYTES = 20_000_000
ROLES = ("user", "assistant")


def new_id() -> str:
    return "c" + secrets.token_hex(6)


def empty_store() -> dict:
    """What a first visit starts from."""
    return {"conversations": {}, "current": None, "settings": {}}


def normalise_store(value: Any) -> dict:
    """Whatever the browser handed back (nothing, an old or a damaged value) as a usable store."""
    if not isinstance(value, dict):
        return empty_store()
    conversations = value.get("conversations")
    store = empty_store()
    if isinstance(conversations, dict):
        for cid, conv in conversations.items():
            try:
                store["conversations"][cid] = check_conversation(conv)
            except ValueError:
                continue  # one damaged conversation must not lose the others
    current = value.get("current")
    store["current"] = current if current in store["conversations"] else None
    if isinstance(value.get("settings"), dict):
        store["settings"] = dict(value["settings"])
    return store


def title_from(text: str) -> str:
    """A sidebar title from the first user message: one line, at most TITLE_CHARS characters."""
    line = re.sub(r"\s+", " ", text or "").strip()
    if not line:
        return UNTITLED
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"


def sidebar_choices(store: dict) -> list[tuple[str, str]]:
    """(title, id) for every conversation, most recently changed first."""
    conversations = sorted(store["conversations"].values(), key=lambda c: c.get("updated", 0), reverse=True)
    return [(c.get("title") or UNTITLED, c["id"]) for c in conversations]


def has_content(conv: dict) -> bool:
    return bool(conv.get("messages"))


def put(store: dict, conv: dict) -> dict:
    """Store (or replace) a conversation and make it the current one; empty ones are not listed."""
    if has_content(conv):
        store["conversations"][conv["id"]] = conv
    store["current"] = conv["id"] if has_content(conv) else None
    return store


def rename(store: dict, cid: str, title: str) -> dict:
    if cid not in store["conversations"]:
        raise ValueError("pick a conversation with at least one message to rename")
    title = re.sub(r"\s+", " ", title or "").strip()
    if not title:
        raise ValueError("a title cannot be empty")
    store["conversations"][cid]["title"] = title[:200]
    store["conversations"][cid]["renamed"] = True
    return store


def delete(store: dict, cid: str) -> dict:
    store["conversations"].pop(cid, None)
    if store.get("current") == cid:
        store["current"] = None
    return store


# ---- checking what comes from outside (the browser, an imported file) -----------------------------------------

def check_message(m: Any) -> dict:
    """A stored message, checked and completed (old exports carry just role and content)."""
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise ValueError(f"each message needs a role ('user' or 'assistant') and a text content, got {str(m)[:80]}")
    out = {"role": m["role"], "content": m["content"]}
    if m["role"] == "user":
        for key in ("shown", "failed"):
            if isinstance(m.get(key), str) and m[key]:
                out[key] = m[key]
        return out
    versions = m.get("versions")
    if not isinstance(versions, list) or not versions or not all(
            isinstance(v, dict) and isinstance(v.get("content"), str) for v in versions):
        versions = [{"content": m["content"], "stats": m.get("stats") if isinstance(m.get("stats"), dict) else {}}]
    current = m.get("current")
    if not isinstance(current, int) or not 0 <= current < len(versions):
        current = len(versions) - 1
    out["versions"] = [dict(v) for v in versions]
    for v in out["versions"]:
        if not isinstance(v.get("stats"), dict):
            v["stats"] = {}
    out["current"] = current
    out["content"] = out["versions"][current]["content"]
    out["stats"] = out["versions"][current]["stats"]
    return out


def check_conversation(conv: Any) -> dict:
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        raise ValueError("each conversation needs a list of messages")
    messages = [check_message(m) for m in conv["messages"]]
    now = time.time()
    cid = conv.get("id") if isinstance(conv.get("id"), str) and re.fullmatch(r"[\w-]{1,64}", conv["id"]) else new_id()
    first_user = next((m.get("shown", m["content"]) for m in messages if m["role"] == "user"), "")
    title = conv.get("title") if isinstance(conv.get("title"), str) and conv["title"].strip() else title_from(first_user)
    system = conv.get("system") if isinstance(conv.get("system"), str) else None
    params = conv.get("params") if isinstance(conv.get("params"), dict) else {}
    number = (int, float)
    return {"id": cid, "title": title[:200], "renamed": bool(conv.get("renamed")), "messages": messages,
            "model": conv.get("model") if isinstance(conv.get("model"), str) else "", "system": system,
            "params": params,
            "created": conv["created"] if isinstance(conv.get("created"), number) else now,
            "updated": conv["updated"] if isinstance(conv.get("updated"), number) else now}


# ---- export and import --------------------------------------------------------------------------------------

def export_json(store: dict) -> str:
    """Every conversation, newest first, in the file format import_json reads back."""
    conversations = [store["conversations"][cid] for _, cid in sidebar_choices(store)]
    return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "conversations": conversations},
                      ensure_ascii=False, indent=1)


def export_markdown(store: dict) -> str:
    """Every conversation as readable Markdown: a heading each, then the turns (the versions on screen)."""
    parts = []
    for _, cid in sidebar_choices(store):
        conv = store["conversations"][cid]
        parts.append(f"# {conv['title']}\n")
        if conv.get("model"):
            parts.append(f"*Model: {conv['model']}*\n")
        for m in conv["messages"]:
            who = "User" if m["role"] == "user" else "Assistant"
            text = m.get("shown", m["content"])
            note = f" *(not answered: {m['failed']})*" if m.get("failed") else ""
            parts.append(f"**{who}:**{note}\n\n{text}\n")
    return "\n".join(parts) if parts else "*No conversations yet.*\n"


def import_json(store: dict, text: str) -> tuple[dict, int]:
    """Add the conversations of an exported file to the store; returns (store, how many were added).

    A conversation whose id is already stored replaces it (importing the same file twice adds nothing)."""
    if len(text) > MAX_IMPORT_BYTES:
        raise ValueError(f"the file is larger than {MAX_IMPORT_BYTES // 1_000_000} MB")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"the file is not JSON ({e})") from None
    if isinstance(data, list):  # a bare list of conversations
        data = {"format": FORMAT, "conversations": data}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("conversations"), list):
        raise ValueError(f"this is not a conversation export (expected \"format\": \"{FORMAT}\")")
    imported = [check_conversation(c) for c in data["conversations"]]  # all or nothing
    for conv in imported:
        store["conversations"][conv["id"]] = conv
    if imported:
        store["current"] = max(imported, key=lambda c: c["updated"])["id"]
    return store, len(imported)


def find(store: dict, cid: Optional[str]) -> Optional[dict]:
    return store["conversations"].get(cid) if cid else None
