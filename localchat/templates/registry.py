"""Chat formats for models whose files carry no chat template.

Each format is a jinja template plus the stop strings that end an assistant turn, so a
model run through it stops where its training data stopped. Unknown names get an error
that lists the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_FORMAT = "chatml"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str
    stop: tuple[str, ...]
    description: str


class UnknownChatFormat(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


# A system prompt, when a format has no place for one, goes in front of the first user turn.
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAMA2 = (
    "{% set ns = namespace(sys='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set ns.sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}[INST] {% if loop.first %}{{ ns.sys }}{% endif %}"
    "{{ m['content'] | trim }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)

_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_MISTRAL = (
    "{% set ns = namespace(sys='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set ns.sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.first %}{{ ns.sys }}{% endif %}"
    "{{ m['content'] | trim }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] | trim }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def _role_prefixed(system_default: str, user: str, assistant: str, sep: str, end: str) -> str:
    """Formats of the 'USER: ... ASSISTANT: ...' family (Vicuna, Alpaca, Coati, StackLLaMA)."""
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] }}" + sep + "{% set messages = messages[1:] %}"
        "{% else %}" + system_default + "{% endif %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}" + user + "{{ m['content'] | trim }}" + sep +
        "{% elif m['role'] == 'assistant' %}" + assistant + "{{ m['content'] | trim }}" + end +
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + assistant.rstrip(" ") + "{% endif %}"
    )


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")
_COATI_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")

_FORMATS = [
    ChatFormat("chatml", _CHATML, ("<|im_end|>", "<|im_start|>"),
               "ChatML (<|im_start|>role ... <|im_end|>): Qwen, SmolLM, many fine-tunes"),
    ChatFormat("llama-2", _LLAMA2, ("[INST]",), "Llama 2 chat ([INST] ... [/INST], <<SYS>>)"),
    ChatFormat("llama-3", _LLAMA3, ("<|eot_id|>", "<|start_header_id|>"),
               "Llama 3 instruct (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>)"),
    ChatFormat("mistral", _MISTRAL, ("[INST]",), "Mistral instruct ([INST] ... [/INST])"),
    ChatFormat("vicuna", _role_prefixed(_VICUNA_SYSTEM + " ", "USER: ", "ASSISTANT: ", " ", "</s>"),
               ("USER:", "</s>"), "Vicuna v1.1 (USER: ... ASSISTANT: ...)"),
    ChatFormat("alpaca", _role_prefixed(_ALPACA_SYSTEM + "\n\n", "### Instruction:\n",
                                        "### Response:\n", "\n\n", "\n\n"),
               ("### Instruction:", "###"), "Alpaca (### Instruction: ... ### Response:)"),
    ChatFormat("coati", _role_prefixed(_COATI_SYSTEM + "\n\n", "Human: ", "Assistant: ", "\n", "</s>"),
               ("Human:", "</s>"), "ColossalChat Coati (Human: ... Assistant: ...)"),
    ChatFormat("stackllama", _role_prefixed("", "Question: ", "Answer: ", "\n\n", "\n\n"),
               ("Question:",), "TRL StackLLaMA (Question: ... Answer: ...)"),
    ChatFormat("zephyr",
               "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
               ("<|user|>", "</s>"), "Zephyr (<|user|> ... </s>)"),
    ChatFormat("gemma",
               "{{ bos_token }}{% set ns = namespace(sys='') %}"
               "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
               "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
               "{% if m['role'] == 'user' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
               "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
               ("<end_of_turn>",), "Gemma (<start_of_turn>user ... <end_of_turn>)"),
    ChatFormat("phi-3",
               "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
               ("<|end|>", "<|user|>"), "Phi-3 (<|user|> ... <|end|>)"),
]

CHAT_FORMATS: dict[str, ChatFormat] = {f.name: f for f in _FORMATS}


def get_format(name: str) -> ChatFormat:
    try:
        return CHAT_FORMATS[name.lower()]
    except KeyError:
        raise UnknownChatFormat(f"unknown chat format {name!r}; valid: {', '.join(CHAT_FORMATS)}") from None
