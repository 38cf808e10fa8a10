"""The chat page: a Gradio app that streams answers from our model workers through FastChat's controller.

The layout and its event wiring; what each event does lives in web_service.py (answers, Stop, votes)
and web_sidebar.py (the conversations kept in the browser). Two panels share the model picker,
system prompt and sampling settings: a chat and an interactive translation.

    python -m bayling.serve.web --controller-url http://127.0.0.1:21001   # the same as web_server.py
"""
from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import gradio as gr

from .web_client import DEFAULT_READ_TIMEOUT_S, ServeError
from .web_selected import build_selected_panel
from .web_service import BUSY_NOTE, CONTINUE, NEW, REGENERATE, ChatService, key_of
from .web_sidebar import build_sidebar
from .web_state import (CHAT, CSS, LANGUAGES, REFINE_EXAMPLES, THEME_FONT, TRANSLATE, Session, WebConfig,
                        error_note, message_at, no_worker_message, read_params, render_chat,
                        translation_instruction)

EXAMPLES = ["Explain what a large language model is, in three sentences.",
            "Write a Python function that checks whether a string is a palindrome.",
            "Translate into Chinese: The weather is lovely today, let's go for a walk in the park.",
            "Give me three ideas for a weekend trip."]
PAGE_JS = """(store, width) => { document.documentElement.lang = 'en'; return [store, window.innerWidth]; }"""


def _welcome(model: Optional[str]) -> str:
    name = f"**{model}**" if model else "no model yet (start a worker, then press Refresh)"
    return f"### Chat with {name}\nAsk anything, or start from an example below."


class Page:
    """The components both panels share, and the service behind them."""

    def __init__(self, service: ChatService, model, system, temperature, top_p, max_new_tokens, settings_error):
        self.service = service
        self.model, self.system, self.settings_error = model, system, settings_error
        self.settings = [model, system, temperature, top_p, max_new_tokens]
        self.streaming = {"concurrency_id": "generate", "concurrency_limit": service.config.concurrency}

    async def run(self, panel: str, request, session: Session, model, system, temperature, top_p, max_new_tokens,
                  mode: str = NEW):
        """Answer the conversation as it stands; yields (session, chat, send, stop, continue)."""
        try:
            params = read_params(temperature, top_p, max_new_tokens)
        except ValueError as e:
            session.notice = error_note(f"{e} (fix it under Settings)")
            yield session, render_chat(session), *_buttons(False, session)
            return
        async for s in self.service.answer(key_of(request, panel), session, model, system, params, mode):
            busy = self.service.busy(key_of(request, panel)) and s.notice != BUSY_NOTE
            yield s, render_chat(s), *_buttons(busy, s)


def _buttons(busy: bool, session: Session) -> tuple:
    """Send and Stop share one place: while answering only Stop shows. Continue: after a cut-off answer."""
    last = session.messages[-1] if session.messages else {}
    cut = not busy and last.get("role") == "assistant" and (last.get("stats") or {}).get("finish") == "length"
    return gr.Button(visible=not busy), gr.Button(visible=busy), gr.Button(visible=cut)


def _input_row(panel: str, placeholder: str, send_label: str = "Send", autofocus: bool = False):
    with gr.Row(equal_height=True, elem_classes="input-row"):
        text = gr.Textbox(show_label=False, placeholder=placeholder, lines=1, max_lines=8, scale=6,
                          elem_id=f"{panel}-input" if panel == CHAT else "translate-refine", autofocus=autofocus)
        send = gr.Button(send_label, variant="primary", scale=1, min_width=72,
                         elem_id=f"{panel}-send" if panel == CHAT else "translate-refine-send")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=72, visible=False, elem_id=f"{panel}-stop")
    return text, send, stop


def _wire(page: Page, panel: str, session, chatbot, text, send, stop, status, comment, extra_outputs=()):
    """Send, Stop, Retry, Edit, Undo, Continue and votes: the same for both panels."""
    service = page.service
    outs = [session, chatbot, send, stop, page.continue_buttons[panel]]

    async def on_send(request: gr.Request, text: str, session: Session, *values: Any):
        if not (text or "").strip():
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        if service.busy(key_of(request, panel)):  # refused with a note; the text stays in the box
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), BUSY_NOTE
            return
        if panel == TRANSLATE and not any(m["role"] == "assistant" for m in session.messages):
            yield (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                   "Translate something first, then refine the translation here.")
            return
        session.messages.append({"role": "user", "content": text.strip()})
        first = True
        async for out in page.run(panel, request, session, *values):
            yield ("" if first else gr.skip()), *out, ""  # empty the box once; later yields leave new typing alone
            first = False

    async def on_retry(request: gr.Request, session: Session, *values: Any):
        if not session.messages or service.busy(key_of(request, panel)):
            yield session, render_chat(session), *_buttons(service.busy(key_of(request, panel)), session)
            return
        last = session.messages[-1]
        last.pop("failed", None)
        mode = REGENERATE if last["role"] == "assistant" else NEW
        async for out in page.run(panel, request, session, *values, mode=mode):
            yield out

    async def on_continue(request: gr.Request, session: Session, *values: Any):
        async for out in page.run(panel, request, session, *values, mode=CONTINUE):
            yield out

    async def on_edit(request: gr.Request, data: gr.EditData, session: Session, *values: Any):
        index = message_at(session, data.index)
        if index is None or service.busy(key_of(request, panel)) or session.messages[index]["role"] != "user":
            yield session, render_chat(session), *_buttons(service.busy(key_of(request, panel)), session)
            return
        new_text = data.value if isinstance(data.value, str) else str(data.value)
        if panel == TRANSLATE and "shown" in session.messages[index]:  # edit the text, keep the instruction
            old = session.messages[index]
            old_content = old["content"].replace(old["shown"], new_text.strip())
            session.messages[index] = {"role": "user", "content": old_content, "shown": new_text.strip()}
        else:
            session.messages[index] = {"role": "user", "content": new_text.strip()}
        del session.messages[index + 1:]  # resend from the edited message
        async for out in page.run(panel, request, session, *values):
            yield out

    def on_undo(request: gr.Request, session: Session):
        """Delete the last turn (the question and its answer); the question goes back into the box."""
        if service.busy(key_of(request, panel)) or not session.messages:
            return gr.skip(), gr.skip(), gr.skip()
        while session.messages and session.messages[-1]["role"] == "assistant":
            session.messages.pop()
        question = session.messages.pop() if session.messages else {"content": ""}
        session.notice = ""
        return session, render_chat(session), question.get("shown", question["content"])

    async def on_stop(request: gr.Request):
        await service.stop(key_of(request, panel))

    def on_like(request: gr.Request, data: gr.LikeData, session: Session, comment: str):
        ip = getattr(getattr(request, "client", None), "host", None)
        return service.vote(key_of(request, panel), session, data.index, data.liked, comment, ip)

    def reset(request: gr.Request, session: Session):
        return _buttons(service.busy(key_of(request, panel)), session)  # a refused send leaves Stop in place

    streaming = page.streaming
    send_outs = [text, *outs, status]
    events = [text.submit(on_send, [text, session, *page.settings], send_outs, trigger_mode="multiple", **streaming),
              send.click(on_send, [text, session, *page.settings], send_outs, **streaming),
              chatbot.retry(on_retry, [session, *page.settings], outs, **streaming),
              chatbot.edit(on_edit, [session, *page.settings], outs, **streaming),
              page.continue_buttons[panel].click(on_continue, [session, *page.settings], outs, **streaming)]
    for event in events:  # the last streamed output still says busy: put Send back once the event is over
        event.then(reset, session, [send, stop, page.continue_buttons[panel]], queue=False)
        after = event.then(page.sync_models, [session, page.model], page.model)
        page.after_answer(panel, after, session)
    chatbot.undo(on_undo, session, [session, chatbot, text], queue=False)
    stop.click(on_stop, None, None, queue=False)
    chatbot.like(on_like, [session, comment], status, queue=False)
    return events


def build_demo(config: WebConfig) -> gr.Blocks:
    """The whole page; launch it with run_web_server or mount it in a FastAPI app."""
    service = ChatService(config)
    with gr.Blocks(title=config.title, analytics_enabled=False) as demo:
        store = gr.BrowserState(None, storage_key="bayling-web-v1")
        width = gr.Number(visible=False, value=0)
        chat_session, translate_session = gr.State(Session()), gr.State(Session())
        sidebar = build_sidebar(service, store, chat_session)
        gr.Markdown(f"## {config.title}", elem_id="bayling-title")
        with gr.Row():
            with gr.Column(scale=3, min_width=320):
                with gr.Tabs():
                    with gr.Tab("Chat", id=CHAT, elem_id="chat-tab"):
                        chatbot = gr.Chatbot(show_label=False, height="62vh", min_height=260, elem_id="chat-chatbot",
                                             buttons=["copy"], editable="user", placeholder=_welcome(None),
                                             feedback_options=("Like", "Dislike", "Flag"),
                                             examples=[{"text": e} for e in EXAMPLES])
                        text, send, stop = _input_row(CHAT, "Message (Enter to send, Shift+Enter for a new line)",
                                                      autofocus=True)
                        with gr.Row(elem_classes="answer-actions"):
                            chat_continue = gr.Button("Continue", size="sm", visible=False, elem_id="chat-continue")
                            chat_comment = gr.Textbox(show_label=False, placeholder="Comment for your next vote "
                                                      "(optional)", lines=1, scale=4, elem_id="chat-comment")
                        chat_status = gr.Markdown(elem_classes="vote-status", elem_id="chat-status")
                        selected_events = build_selected_panel(service, CHAT, chat_session, chatbot)
                    with gr.Tab("Translate", id=TRANSLATE, elem_id="translate-tab"):
                        tr = _translate_layout()
            with gr.Column(scale=1, min_width=280):
                with gr.Accordion("Model and settings", open=True, elem_id="settings") as settings_box:
                    with gr.Row(equal_height=True):
                        model = gr.Dropdown(label="Model", choices=[], value=None, scale=5, elem_id="model-picker")
                        reload = gr.Button("Refresh", scale=0, min_width=70, size="sm", elem_id="reload-models")
                    status = gr.Markdown(elem_id="model-status")
                    system = gr.Textbox(label="System prompt", lines=3, max_lines=12, elem_id="system-prompt",
                                        placeholder="Empty: the model's default system prompt")
                    temperature = gr.Number(0.7, label="Temperature", info="0 to 2; 0 = greedy", elem_id="temperature")
                    top_p = gr.Number(1.0, label="Top p", info="above 0, at most 1", elem_id="top-p")
                    max_new_tokens = gr.Number(512, label="Max new tokens", info="1 to 4096", precision=0,
                                               elem_id="max-new-tokens")
                    settings_error = gr.Markdown(elem_id="settings-error")
        page = Page(service, model, system, temperature, top_p, max_new_tokens, settings_error)
        page.continue_buttons = {CHAT: chat_continue, TRANSLATE: tr["continue"]}
        page.sync_models = _sync_models(service)
        page.after_answer = lambda panel, event, session: (
            event.then(sidebar.save, [chat_session, store, *page.settings], [store, sidebar.list])
            if panel == CHAT else None)
        _wire(page, CHAT, chat_session, chatbot, text, send, stop, chat_status, chat_comment)
        sidebar.wire(chatbot)
        for event in selected_events:
            page.after_answer(CHAT, event, chat_session)
        _wire_translate(page, tr, translate_session)

        def on_example(data: gr.SelectData):
            return data.value.get("text", "") if isinstance(data.value, dict) else str(data.value)

        chatbot.example_select(on_example, None, text, queue=False)
        chatbot.clear(sidebar.new_chat_fn, [chat_session, store], [chat_session, chatbot, store, sidebar.list],
                      queue=False)
        load = demo.load(sidebar.restore, [store, width], [chat_session, chatbot, store, sidebar.list, *page.settings,
                                                           sidebar.box, settings_box], js=PAGE_JS)
        models = _load_models(service)
        load.then(models, [model, system], [model, system, status, chatbot])
        reload.click(models, [model, system], [model, system, status, chatbot])
        model.input(service.system_for, model, system)
        for box in page.settings[2:]:
            box.input(_check_settings, page.settings[2:], settings_error, queue=False)
    return demo


def _check_settings(temperature, top_p, max_new_tokens) -> str:
    """An out-of-range value is shown next to the settings, and sending refuses it (never silently corrected)."""
    try:
        read_params(temperature, top_p, max_new_tokens)
    except ValueError as e:
        return error_note(str(e))
    return ""


def _load_models(service: ChatService):
    async def load(current: Optional[str], system: Optional[str]):
        """(model picker, system prompt, status, welcome): an edited system prompt is kept."""
        try:
            models = await service.models()
        except ServeError as e:
            return gr.Dropdown(choices=[], value=None), gr.skip(), error_note(str(e)), gr.skip()
        if not models:
            return (gr.Dropdown(choices=[], value=None), gr.skip(), error_note(no_worker_message(service.controller.url)),
                    gr.Chatbot(placeholder=_welcome(None)))
        model = current if current in models else models[0]
        keep = model == current and (system or "").strip()
        return (gr.Dropdown(choices=models, value=model), gr.skip() if keep else await service.system_for(model), "",
                gr.Chatbot(placeholder=_welcome(model)))
    return load


def _sync_models(service: ChatService):
    async def sync(session: Session, model: Optional[str]) -> Any:
        """After a worker vanished or came back: refresh the model picker; otherwise leave it alone."""
        if not session.workers_changed:
            return gr.skip()
        session.workers_changed = False
        try:
            models = await service.controller.list_models(refresh=False)
        except ServeError:
            return gr.skip()
        chosen = model if model in models else (session.model if session.model in models else
                                                 (models[0] if models else None))
        return gr.Dropdown(choices=models, value=chosen)
    return sync


def _translate_layout() -> dict:
    with gr.Row(equal_height=True):
        source_lang = gr.Dropdown(list(LANGUAGES), value="Chinese", label="From", elem_id="source-lang")
        swap = gr.Button("Swap", scale=0, min_width=64, size="sm", elem_id="swap-langs")
        target_lang = gr.Dropdown(list(LANGUAGES), value="English", label="To", elem_id="target-lang")
    with gr.Row(equal_height=True):
        source = gr.Textbox(label="Text to translate", lines=2, max_lines=10, scale=6, elem_id="translate-source")
        translate = gr.Button("Translate", variant="primary", scale=1, min_width=90, elem_id="translate-run")
    chatbot = gr.Chatbot(show_label=False, height=300, elem_id="translate-chatbot", buttons=["copy"],
                         feedback_options=("Like", "Dislike", "Flag"))
    refine, send, stop = _input_row(TRANSLATE, "Refine it: e.g. \"Make it more formal.\"", "Refine")
    with gr.Row(elem_classes="answer-actions"):
        cont = gr.Button("Continue", size="sm", visible=False, elem_id="translate-continue")
        comment = gr.Textbox(show_label=False, placeholder="Comment for your next vote (optional)", lines=1,
                             scale=4, elem_id="translate-comment")
    examples = gr.Examples([[e] for e in REFINE_EXAMPLES], inputs=refine, label="Follow-up instructions")
    status = gr.Markdown(elem_classes="vote-status", elem_id="translate-status")
    return dict(source_lang=source_lang, swap=swap, target_lang=target_lang, source=source, translate=translate,
                chatbot=chatbot, refine=refine, send=send, stop=stop, comment=comment, status=status,
                examples=examples, **{"continue": cont})


def _wire_translate(page: Page, tr: dict, session) -> None:
    service = page.service
    _wire(page, TRANSLATE, session, tr["chatbot"], tr["refine"], tr["send"], tr["stop"], tr["status"], tr["comment"])
    outs = [session, tr["chatbot"], tr["send"], tr["stop"], page.continue_buttons[TRANSLATE]]

    async def on_translate(request: gr.Request, text: str, source_lang: str, target_lang: str,
                           session: Session, *values: Any):
        if service.busy(key_of(request, TRANSLATE)):
            yield (gr.skip(),) * 5 + (BUSY_NOTE,)
            return
        if source_lang == target_lang:
            yield (gr.skip(),) * 5 + (f"Both languages are {source_lang}: pick another target language.",)
            return
        session = Session()  # a new text starts a new conversation
        if not (text or "").strip():
            session.notice = "Type the text to translate first."
            yield session, render_chat(session), *_buttons(False, session), ""
            return
        session.messages.append({"role": "user", "content": translation_instruction(text, source_lang, target_lang),
                                 "shown": text.strip()})  # the bubble shows the visitor's text
        async for out in page.run(TRANSLATE, request, session, *values):
            yield *out, ""

    def on_swap(a: str, b: str, text: str, session: Session):
        """Swap the languages, and the texts: the last translation becomes the text to translate."""
        answers = [m["content"] for m in session.messages if m["role"] == "assistant"]
        return b, a, (answers[-1] if answers else text)

    def reset(request: gr.Request, session: Session):
        return _buttons(service.busy(key_of(request, TRANSLATE)), session)

    inputs = [tr["source"], tr["source_lang"], tr["target_lang"], session, *page.settings]
    for trigger in (tr["translate"].click, tr["source"].submit):
        event = trigger(on_translate, inputs, [*outs, tr["status"]], **page.streaming)
        event.then(reset, session, outs[2:], queue=False)
        event.then(page.sync_models, [session, page.model], page.model)
    tr["swap"].click(on_swap, [tr["source_lang"], tr["target_lang"], tr["source"], session],
                     [tr["source_lang"], tr["target_lang"], tr["source"]], queue=False)


def parse_auth(text: Optional[str]) -> Optional[tuple[str, str]]:
    """--auth USER:PASS -> (user, password); None stays None."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like USER:PASSWORD (both non-empty)")
    return user, password


def run_web_server(config: WebConfig, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
                   auth: Optional[tuple[str, str]] = None) -> None:
    """Serve the page until interrupted."""
    theme = gr.themes.Soft(primary_hue="blue", font=THEME_FONT, font_mono=["ui-monospace", "monospace"])
    demo = build_demo(config)
    demo.queue(default_concurrency_limit=config.concurrency)
    demo.launch(server_name=host, server_port=port, share=share, auth=auth, theme=theme, css=CSS,
                ssr_mode=False, show_error=True, footer_links=[])


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m bayling.serve.web` (and `python web_server.py`): parse the flags and serve the page."""
    parser = argparse.ArgumentParser(prog="python -m bayling.serve.web",
                                     description="The BayLing chat page over a FastChat controller and our workers")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--controller-url", default="http://127.0.0.1:21001", help="the FastChat controller")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--auth", metavar="USER:PASS", default=None, help="require this login")
    parser.add_argument("--log-dir", default="logs", help="where upvote/downvote/flag logs go (one file a day)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                        help="seconds of silence from a worker before the page reports a timeout")
    parser.add_argument("--concurrency", type=int, default=16, help="answers streamed at once")
    args = parser.parse_args(argv)
    try:
        auth = parse_auth(args.auth)
    except ValueError as e:
        parser.error(str(e))
    if not args.controller_url.startswith(("http://", "https://")):
        parser.error(f"--controller-url must start with http:// or https://, got {args.controller_url!r}")
    if args.timeout <= 0 or args.concurrency < 1:
        parser.error("--timeout must be > 0 and --concurrency >= 1")
    config = WebConfig(controller_url=args.controller_url, log_dir=args.log_dir, timeout_s=args.timeout,
                       concurrency=args.concurrency)
    run_web_server(config, host=args.host, port=args.port, share=args.share, auth=auth)


if __name__ == "__main__":
    main()
