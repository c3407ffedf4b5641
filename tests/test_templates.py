"""Chat templates: sandboxed rendering, hostile templates refused, the fallback registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from localchat.templates import (CHAT_FORMATS, TemplateError, TemplateSecurityError, UnknownChatFormat,
                                 get_format, render_chat)

CONVO = [{"role": "system", "content": "SYS-TEXT"}, {"role": "user", "content": "USER-ONE"},
         {"role": "assistant", "content": "BOT-ONE"}, {"role": "user", "content": "USER-TWO"}]


@pytest.mark.parametrize("payload", [
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ lipsum.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages }}",
])
def test_hostile_template_is_refused_and_runs_nothing(payload: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = payload.replace("MARKER", str(tmp_path / "pwned"))
    with pytest.raises(TemplateSecurityError, match="refused: it tried to leave the sandbox"):
        render_chat(source, CONVO, origin="chat template of evil.gguf")
    assert not (tmp_path / "pwned").exists()


def test_template_errors_are_clear() -> None:
    with pytest.raises(TemplateError, match="evil.gguf has a syntax error at line 1"):
        render_chat("{% for %}", CONVO, origin="evil.gguf")
    with pytest.raises(TemplateError, match="rejected the conversation: roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", CONVO)


@pytest.mark.parametrize("name", list(CHAT_FORMATS))
def test_every_registry_format_renders_the_whole_conversation(name: str) -> None:
    fmt = get_format(name)
    text = render_chat(fmt.template, CONVO, bos_token="<s>", eos_token="</s>")
    positions = [text.index(part) for part in ("SYS-TEXT", "USER-ONE", "BOT-ONE", "USER-TWO")]
    assert positions == sorted(positions), "turns keep their order"
    assert fmt.stop, "every format says where an answer ends"
    # the prompt ends by handing the turn to the assistant, not with the user's words
    assert not text.rstrip().endswith("USER-TWO")


def test_unknown_format_lists_valid_names() -> None:
    with pytest.raises(UnknownChatFormat) as exc:
        get_format("gpt-9")
    assert "valid: chatml, llama-2, llama-3" in str(exc.value)
    assert "vicuna" in str(exc.value) and "alpaca" in str(exc.value)


def test_llama3_format_exact() -> None:
    text = render_chat(get_format("llama-3").template, [{"role": "user", "content": "hi"}],
                       bos_token="<|begin_of_text|>")
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
