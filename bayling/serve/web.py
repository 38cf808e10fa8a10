"""The chat page: a Gradio app that streams answers from our model workers through FastChat's controller.

Two panels share the model picker, system prompt and sampling controls: a plain chat and an
interactive translation (translate, then refine with follow-up instructions). Each browser tab
keeps its conversations in gr.State; Stop ends the stream, and closing the stream is what makes
the worker abort the request.
"""
from __future__ import annotations

import logging
from contextlib import aclosing
from datetime import datetime
from typing import Any, AsyncIterator, Optional

import gradio as gr

from ..params import GenerationParams
from .web_state import (CHAT, TRANSLATE, VOTES, STOPPED_NOTE, EMPTY_NOTE, LANGUAGES, REFINE_EXAMPLES, THEME_FONT, CSS,
                        WebConfig, Session, translation_instruction, read_params, build_payload,
                        no_worker_message, error_note, render_chat, vote_record, append_log,
                        drop_empty_reply, STOP, CLEAR, CLEAR_WAIT_S,
                        StreamToken, Streams)
from .web_client import (NO_WORKER, WORKER_GONE, ControllerClient, ServeError,
                         default_system_prompt, generate_stream, until_set)

log = logging.getLogger("bayling.serve.web")


def _key(request: Optional[gr.Request], panel: str) -> tuple[str, str]:
    return (getattr(request, "session_hash", None) or "anonymous", panel)


class ChatService:
    """The page's behaviour, independent of its layout: each public method is one event handler."""

    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self.controller = ControllerClient(config.controller_url)
        self.streams = Streams()

    async def load_models(self, current: Optional[str] = None) -> tuple[Any, Any, str]:
        """(model dropdown, system prompt, status line) from the controller's list."""
        try:
            models = await self.controller.list_models()
        except ServeError as e:
            return gr.Dropdown(choices=[], value=None), gr.skip(), error_note(str(e))
        if not models:
            return gr.Dropdown(choices=[], value=None), "", error_note(no_worker_message(self.controller.url))
        model = current if current in models else models[0]
        return gr.Dropdown(choices=models, value=model), await self.system_for(model), ""

    async def system_for(self, model: Optional[str]) -> str:
        """The chosen model's default system prompt, to prefill the editable box."""
        if not model:
            return ""
        try:
            return await default_system_prompt(await self.controller.worker_address(model)) or ""
        except ServeError:
            return ""

    async def sync_models(self, session: Session, model: Optional[str]) -> Any:
        """After a worker vanished: refresh the model picker; otherwise leave it alone."""
        if not session.workers_changed:
            return gr.skip()
        session.workers_changed = False
        try:
            models = await self.controller.list_models(refresh=False)
        except ServeError:
            return gr.skip()
        return gr.Dropdown(choices=models, value=model if model in models else (models[0] if models else None))

    async def answer(self, key: tuple[str, str], session: Session, model: Optional[str], system: Optional[str],
                     params: GenerationParams) -> AsyncIterator[Session]:
        """Stream the reply to session.messages into the session, yielding it after each chunk."""
        token = self.streams.start(key)
        assert token is not None, "handlers call take_turn() before changing the conversation"
        try:  # however this ends (also closed by Gradio mid-stream), the panel must be freed
            session.notice, session.context_note, session.model = "", "", model or ""
            session.system = system if system and system.strip() else None
            session.params = {"temperature": params.temperature, "top_p": params.top_p,
                              "max_new_tokens": params.max_new_tokens}
            yield session  # the user's message appears at once
            try:
                async with aclosing(self._stream_reply(session, model, params, token)) as steps:
                    async for _ in steps:  # closing it closes the HTTP stream: the worker aborts
                        yield session
            except ServeError as e:
                if not token.reason:  # after Stop or Clear a broken stream is expected, not news
                    session.notice = error_note(str(e))
                    if e.kind in (WORKER_GONE, NO_WORKER):
                        session.workers_changed = True
                        await self._forget_dead_workers()
            except Exception as e:  # a bug must still end in a message, not a spinner
                log.exception("answering failed")
                session.notice = error_note(f"the web server failed: {type(e).__name__}: {e}")
            if token.reason == STOP:
                session.notice = STOPPED_NOTE
            if not drop_empty_reply(session) and not session.notice:
                session.notice = EMPTY_NOTE
            if token.reason != CLEAR:  # Clear draws the empty chat itself, after this returns
                yield session
        finally:
            self.streams.finish(key, token)

    async def _stream_reply(self, session: Session, model: Optional[str], params: GenerationParams,
                            token: StreamToken) -> AsyncIterator[None]:
        """Append the worker's answer to session.messages, updating it in place after each chunk."""
        if not model:
            raise await self._no_model_error()
        address = await self.controller.worker_address(model)
        payload = build_payload(model, session.messages, session.system, params)
        reply: Optional[dict] = None
        async with generate_stream(address, payload, self.config.timeout_s) as chunks:
            async for chunk in until_set(token.stopped, chunks):
                if reply is None and not chunk.text:
                    continue  # no empty bubble before the first words
                if reply is None:
                    reply = {"role": "assistant", "content": ""}
                    session.messages.append(reply)
                reply["content"], session.context_note = chunk.text, chunk.notice
                yield

    async def _forget_dead_workers(self) -> None:
        try:
            await self.controller.refresh()  # the controller drops dead workers now instead of in 90 s
        except ServeError:
            pass

    async def _no_model_error(self) -> ServeError:
        models = await self.controller.list_models()  # a ServeError here (controller down) says more
        if models:
            return ServeError(f"no model is selected: pick one of {', '.join(models)} above", NO_WORKER)
        return ServeError(no_worker_message(self.controller.url), NO_WORKER)

    async def take_turn(self, panel: str, request: Optional[gr.Request]) -> bool:
        """Before a new question: stop the panel's running answer (it keeps its partial text) and wait
        until it is done; False if it would not end, and the new question must be dropped."""
        key = _key(request, panel)
        await self.streams.stop(key, STOP, wait_s=CLEAR_WAIT_S)
        return not self.streams.busy(key)

    async def stop(self, panel: str, request: Optional[gr.Request]) -> None:
        """Stop the panel's answer; what was streamed so far stays in the conversation."""
        await self.streams.stop(_key(request, panel), STOP)

    async def clear(self, panel: str, request: Optional[gr.Request]) -> None:
        """End the panel's answer (if any) and wait until it has drawn its last output."""
        await self.streams.stop(_key(request, panel), CLEAR, wait_s=CLEAR_WAIT_S)

    def vote(self, kind: str, session: Session, request: Optional[gr.Request]) -> str:
        """Append the conversation to today's log; returns the status line to show."""
        if not session.messages:
            return "Nothing to log yet: start a conversation first."
        now = datetime.now()
        ip = getattr(getattr(request, "client", None), "host", None)
        path = append_log(self.config.log_dir, vote_record(kind, session, ip, now), now)
        return f"Logged your {kind} to `{path}` at {now:%H:%M:%S}."

    async def run(self, panel: str, session: Session, request: Optional[gr.Request], model: Optional[str],
                  system: Optional[str], temperature: float, top_p: float, max_new_tokens: float
                  ) -> AsyncIterator[tuple[Session, list[dict]]]:
        """Answer the conversation as it stands (its last message is the user's); yields (session, chat)."""
        try:
            params = read_params(temperature, top_p, max_new_tokens)
        except ValueError as e:
            session.notice = error_note(str(e))
            yield session, render_chat(session)
            return
        async for s in self.answer(_key(request, panel), session, model, system, params):
            yield s, render_chat(s)

    def regenerable(self, session: Session) -> bool:
        """Drop the last answer so that it can be asked for again; False when there is nothing to redo."""
        session.notice = ""
        if session.messages and session.messages[-1]["role"] == "assistant":
            session.messages.pop()
        if not session.messages:
            session.notice = "Nothing to regenerate yet."
            return False
        return True


# ---- the page -----------------------------------------------------------------------------------------------

def _panel_controls(panel: str) -> tuple[gr.Button, gr.Button, gr.Button, list[gr.Button], gr.Markdown]:
    with gr.Row():
        stop = gr.Button("Stop", variant="stop", elem_id=f"{panel}-stop")
        regenerate = gr.Button("Regenerate", elem_id=f"{panel}-regenerate")
        clear = gr.Button("Clear", elem_id=f"{panel}-clear")
    with gr.Row():
        votes = [gr.Button(label, size="sm", elem_id=f"{panel}-{kind}")
                 for kind, label in zip(VOTES, ("Upvote", "Downvote", "Flag"))]
    status = gr.Markdown(elem_classes="vote-status", elem_id=f"{panel}-vote-status")
    return stop, regenerate, clear, votes, status


def _wire_panel(service: ChatService, panel: str, session: gr.State, chatbot: gr.Chatbot, model: gr.Dropdown,
                settings: list, first_events: list, to_clear: list) -> None:
    """Stop, Regenerate, Clear and the votes: the same for every conversation panel."""
    stop, regenerate, clear, votes, vote_status = _panel_controls(panel)
    streaming = {"concurrency_id": "generate", "concurrency_limit": service.config.concurrency}

    async def on_regenerate(request: gr.Request, session: Session, *values: Any):
        if not await service.take_turn(panel, request):
            yield gr.skip(), gr.skip()
            return
        if not service.regenerable(session):
            yield session, render_chat(session)
            return
        async for out in service.run(panel, session, request, *values):
            yield out

    async def on_stop(request: gr.Request):
        await service.stop(panel, request)

    async def on_clear(request: gr.Request):
        await service.clear(panel, request)
        return (Session(), [], "", *[""] * len(to_clear))

    events = [*first_events, regenerate.click(on_regenerate, [session, *settings], [session, chatbot], **streaming)]
    for event in events:
        event.then(service.sync_models, [session, model], model)
    stop.click(on_stop, None, None, queue=False)
    # The Chatbot's own trash icon must clear the conversation too, not only what is drawn.
    for trigger in (clear.click, chatbot.clear):
        trigger(on_clear, None, [session, chatbot, vote_status, *to_clear], queue=False)
    for kind, button in zip(VOTES, votes):
        def on_vote(request: gr.Request, session: Session, kind: str = kind):
            return service.vote(kind, session, request)
        button.click(on_vote, session, vote_status, queue=False)


def build_demo(config: WebConfig) -> gr.Blocks:
    """The whole page; launch it with run_web_server or mount it in a FastAPI app."""
    service = ChatService(config)
    streaming = {"concurrency_id": "generate", "concurrency_limit": config.concurrency}
    with gr.Blocks(title=config.title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {config.title}\nChat and interactive translation with the models your workers serve.",
                    elem_id="bayling-title")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                with gr.Row(equal_height=True):
                    model = gr.Dropdown(label="Model", choices=[], value=None, scale=5, elem_id="model-picker")
                    reload = gr.Button("↻", scale=0, min_width=44, elem_id="reload-models")
                status = gr.Markdown(elem_id="model-status")
                system = gr.Textbox(label="System prompt", lines=4, max_lines=12, elem_id="system-prompt",
                                    placeholder="Empty: the model's default system prompt")
                with gr.Accordion("Sampling", open=True):
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 = greedy",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top p", elem_id="top-p")
                    max_new_tokens = gr.Slider(16, 4096, value=512, step=16, label="Max new tokens",
                                               elem_id="max-new-tokens")
            with gr.Column(scale=3):
                settings = [model, system, temperature, top_p, max_new_tokens]
                with gr.Tabs():
                    with gr.Tab("Chat", id=CHAT, elem_id="chat-tab"):
                        _chat_panel(service, model, settings, streaming)
                    with gr.Tab("Translate", id=TRANSLATE, elem_id="translate-tab"):
                        _translate_panel(service, model, settings, streaming)
        demo.load(service.load_models, model, [model, system, status])
        reload.click(service.load_models, model, [model, system, status])
        model.input(service.system_for, model, system)
    return demo


def _chat_panel(service: ChatService, model: gr.Dropdown, settings: list, streaming: dict) -> None:
    session = gr.State(Session())
    chatbot = gr.Chatbot(show_label=False, height=460, elem_id="chat-chatbot", buttons=["copy"])
    with gr.Row(equal_height=True):
        text = gr.Textbox(show_label=False, placeholder="Message (Enter to send, Shift+Enter for a new line)",
                          lines=1, max_lines=8, scale=6, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="chat-send")

    async def on_send(request: gr.Request, text: str, session: Session, *values: Any):
        async for out in _ask(service, CHAT, request, text, session, values):
            yield out

    inputs, outputs = [text, session, *settings], [text, session, chatbot]
    events = [text.submit(on_send, inputs, outputs, **streaming), send.click(on_send, inputs, outputs, **streaming)]
    _wire_panel(service, CHAT, session, chatbot, model, settings, events, [text])


async def _ask(service: ChatService, panel: str, request: gr.Request, text: str, session: Session,
               values: tuple) -> AsyncIterator[tuple[Any, Session, list[dict]]]:
    """A new user message in a panel: yields (input box, session, chat) as the answer streams."""
    if not (text or "").strip() or not await service.take_turn(panel, request):
        yield gr.skip(), session, render_chat(session)
        return
    session.notice = ""
    session.messages.append({"role": "user", "content": text.strip()})
    first = True
    async for s, shown in service.run(panel, session, request, *values):
        yield ("" if first else gr.skip()), s, shown  # empty the box once; later yields leave new typing alone
        first = False


def _translate_panel(service: ChatService, model: gr.Dropdown, settings: list, streaming: dict) -> None:
    session = gr.State(Session())
    with gr.Row(equal_height=True):
        source_lang = gr.Dropdown(list(LANGUAGES), value="Chinese", label="From", elem_id="source-lang")
        swap = gr.Button("⇄", scale=0, min_width=44, elem_id="swap-langs")
        target_lang = gr.Dropdown(list(LANGUAGES), value="English", label="To", elem_id="target-lang")
    source = gr.Textbox(label="Text to translate", lines=3, max_lines=12, elem_id="translate-source")
    translate = gr.Button("Translate", variant="primary", elem_id="translate-run")
    chatbot = gr.Chatbot(show_label=False, height=340, elem_id="translate-chatbot", buttons=["copy"])
    with gr.Row(equal_height=True):
        refine = gr.Textbox(show_label=False, placeholder="Refine it: e.g. \"Make it more formal.\"",
                            lines=1, max_lines=6, scale=6, elem_id="translate-refine")
        refine_send = gr.Button("Refine", scale=1, min_width=80, elem_id="translate-refine-send")
    gr.Examples([[e] for e in REFINE_EXAMPLES], inputs=refine, label="Follow-up instructions")

    async def on_translate(request: gr.Request, text: str, source_lang: str, target_lang: str,
                           session: Session, *values: Any):
        if not await service.take_turn(TRANSLATE, request):
            yield gr.skip(), gr.skip()
            return
        session = Session()  # a new text starts a new conversation
        if not (text or "").strip():
            session.notice = "Type the text to translate first."
            yield session, render_chat(session)
            return
        session.messages.append({"role": "user",
                                 "content": translation_instruction(text, source_lang, target_lang)})
        async for out in service.run(TRANSLATE, session, request, *values):
            yield out

    async def on_refine(request: gr.Request, text: str, session: Session, *values: Any):
        if (text or "").strip() and not any(m["role"] == "assistant" for m in session.messages):
            session.notice = "Translate something first, then refine the translation here."
            yield gr.skip(), session, render_chat(session)
            return
        async for out in _ask(service, TRANSLATE, request, text, session, values):
            yield out

    swap.click(lambda a, b: (b, a), [source_lang, target_lang], [source_lang, target_lang], queue=False)
    translate_inputs = [source, source_lang, target_lang, session, *settings]
    refine_inputs, refine_outputs = [refine, session, *settings], [refine, session, chatbot]
    events = [translate.click(on_translate, translate_inputs, [session, chatbot], **streaming),
              source.submit(on_translate, translate_inputs, [session, chatbot], **streaming),
              refine.submit(on_refine, refine_inputs, refine_outputs, **streaming),
              refine_send.click(on_refine, refine_inputs, refine_outputs, **streaming)]
    _wire_panel(service, TRANSLATE, session, chatbot, model, settings, events, [refine])


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
