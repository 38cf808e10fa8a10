"""Conversation templates: BayLing's two prompt formats and the tokenizer's own chat_template."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:
    from .params import GenerationParams

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"

BAYLING_SYSTEM = (
    "I am an intelligent language assistant developed by the NLP Group of ICT/CAS.\n"
    "Below is a dialog consisting of instructions and responses. Write a response that completes the request.\n"
)
BAYLING_ROLES = {USER: "### Instruction:\n", ASSISTANT: "### Response:\n"}
BAYLING_SEP, BAYLING_SEP2 = "\n", "</s>"

BAYLING3_SYSTEM = "I am BayLing developed by the NLP Group of ICT/CAS."
BAYLING3_SYSTEM_FORMAT = "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>"
BAYLING3_ROLES = {
    USER: "<|start_header_id|>user<|end_header_id|>\n\n",
    ASSISTANT: "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
BAYLING3_EOT = "<|eot_id|>"
# Llama-3 ends a turn with <|eot_id|> (128009) and a document with <|end_of_text|> (128001); both end an
# answer whatever the tokenizer's EOS or generation_config say. (Upstream also lists id 2, which in
# Llama-3's vocabulary is "#": not copied, see docs/upstream.md.)
BAYLING3_END_OF_TEXT = "<|end_of_text|>"
# BayLing v1 sometimes writes the next turn itself: "### Instruction:" at the start of a line ends the
# answer, with or without the newline that follows it.
BAYLING_NEXT_TURN = "\n" + BAYLING_ROLES[USER].rstrip("\n")


@dataclass
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Template:
    """How one family of models wants its prompt. render(system, messages, tokenizer) -> str."""

    name: str
    render_fn: Callable[[str, Sequence[Message], Any], str]
    default_system: Optional[str]
    stop: tuple[str, ...] = ()
    stop_tokens: tuple[str, ...] = ()  # special tokens whose ids end generation
    deanonymize: bool = False  # BayLing weights emit [NAME]-style placeholders


def _answer_text(m: Message) -> str:
    """Answers go back into the prompt stripped, as upstream stores them (`outputs.strip()`)."""
    return m.content.strip() if m.role == ASSISTANT else m.content


def _render_bayling(system: str, messages: Sequence[Message], tokenizer: Any = None) -> str:
    parts = [system, BAYLING_SEP]
    for m in messages:
        role, text = BAYLING_ROLES[m.role], _answer_text(m)
        if not text:
            parts.append(role)  # an empty message is an open turn, as upstream renders it
        elif m.role == USER:
            parts.append(role + text + BAYLING_SEP)
        else:
            parts.append(role + text + BAYLING_SEP2 + "\n")
    return "".join(parts)


def _render_bayling3(system: str, messages: Sequence[Message], tokenizer: Any = None) -> str:
    # Llama-3's chat format trims every message; an empty one is an open turn (no <|eot_id|>).
    parts = [BAYLING3_SYSTEM_FORMAT.format(system)]
    for m in messages:
        role, text = BAYLING3_ROLES[m.role], m.content.strip()
        parts.append(role + text + BAYLING3_EOT if text else role)
    return "".join(parts)


def _render_tokenizer(system: Optional[str], messages: Sequence[Message], tokenizer: Any) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat_template; pass --conv-template "
            f"(one of: {', '.join(sorted(TEMPLATES))})"
        )
    chat = [{"role": SYSTEM, "content": system}] if system is not None else []
    add_generation_prompt = bool(messages) and messages[-1].role == ASSISTANT and not messages[-1].content
    done = messages[:-1] if add_generation_prompt else messages
    chat += [{"role": m.role, "content": m.content} for m in done]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


TEMPLATES: dict[str, Template] = {
    "BayLing": Template("BayLing", _render_bayling, BAYLING_SYSTEM,
                        stop=(BAYLING_SEP2, BAYLING_NEXT_TURN), deanonymize=True),
    "BayLing-3": Template("BayLing-3", _render_bayling3, BAYLING3_SYSTEM,
                         stop=(BAYLING3_EOT,), stop_tokens=(BAYLING3_EOT, BAYLING3_END_OF_TEXT), deanonymize=True),
    # The model's own chat_template; None = the template's built-in default system prompt.
    "tokenizer": Template("tokenizer", _render_tokenizer, None),
}
# Lower-case aliases a user may type on the command line.
ALIASES = {"bayling": "BayLing", "bayling-3": "BayLing-3", "bayling3": "BayLing-3", "hf": "tokenizer",
           "chat_template": "tokenizer", "auto": "auto"}


def get_template(name: str) -> Template:
    """Look a template up by name or alias; unknown names get a one-line error."""
    key = name if name in TEMPLATES else ALIASES.get(name.lower(), name)
    if key not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[key]


def choose_template(model_name: str, conv_template: Optional[str] = None) -> Template:
    """--conv-template wins; else BayLing names pick BayLing's formats; else the tokenizer's own."""
    if conv_template and conv_template.lower() != "auto":
        return get_template(conv_template)
    name = model_name.lower()
    if "bayling-2-llama-3" in name or "bayling-llama-3" in name:
        return TEMPLATES["BayLing-3"]
    if "bayling" in name:
        return TEMPLATES["BayLing"]
    return TEMPLATES["tokenizer"]


@dataclass
class Conversation:
    """A multi-turn chat: a template, an optional system prompt override and the messages so far."""

    template: Template
    system: Optional[str] = None
    messages: list[Message] = field(default_factory=list)

    @property
    def system_prompt(self) -> Optional[str]:
        return self.system if self.system is not None else self.template.default_system

    def add(self, role: str, content: str) -> None:
        if role not in (USER, ASSISTANT):
            raise ValueError(f"role must be {USER!r} or {ASSISTANT!r}, got {role!r}")
        self.messages.append(Message(role, content))

    def render(self, tokenizer: Any = None) -> str:
        """The prompt for the model; a trailing empty assistant message is the turn to complete."""
        return self.template.render_fn(self.system_prompt, self.messages, tokenizer)

    def prompt_for_reply(self, tokenizer: Any = None) -> str:
        """Render with an open assistant turn appended (without changing the history)."""
        return self.template.render_fn(self.system_prompt, [*self.messages, Message(ASSISTANT, "")], tokenizer)

    def copy(self) -> "Conversation":
        return Conversation(self.template, self.system, [Message(m.role, m.content) for m in self.messages])

    def to_dict(self) -> dict:
        return {"template": self.template.name, "system": self.system,
                "messages": [{"role": m.role, "content": m.content} for m in self.messages]}

    @classmethod
    def from_dict(cls, data: dict) -> "Conversation":
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValueError("not a saved conversation: expected a JSON object with 'template' and 'messages'")
        conv = cls(get_template(data.get("template", "tokenizer")), data.get("system"))
        for m in data["messages"]:
            conv.add(m["role"], m["content"])
        return conv


def params_for_template(params: "GenerationParams", template: Template, tokenizer: Any) -> "GenerationParams":
    """Add a template's stop strings, stop tokens and de-anonymisation to request params."""
    from dataclasses import replace

    ids = []
    for token in template.stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token) if tokenizer is not None else None
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            ids.append(token_id)
    return replace(params,
                   stop=tuple(dict.fromkeys(params.stop + template.stop)),
                   stop_token_ids=tuple(dict.fromkeys(params.stop_token_ids + tuple(ids))),
                   deanonymize=params.deanonymize or template.deanonymize)
