"""Chat templates: the Jinja template stored in a GGUF file, rendered once per prompt.

Two traps that other tools fall into, and how this module avoids them:

- Doubled BOS. Templates such as Llama 3's write the BOS token as text; a
  tokenizer that also adds BOS then produces two. Rendered text is tokenized
  with special tokens parsed and none added, and BOS is prepended only when
  the model wants one and the text did not already start with it.
- Lost whitespace on continuation. Re-rendering a chat that ends in a partial
  assistant message passes it through the template, which may trim it
  (Llama 3 trims every message) and append an end-of-turn token. Instead the
  chat is rendered with a generation prompt and the partial text is appended
  verbatim, tokenized on its own, so a step that ends in "\\n\\n" continues
  after exactly "\\n\\n".
"""

from __future__ import annotations

import datetime
from functools import lru_cache
from typing import Sequence
from ..errors import InputError

# The ChatML format, as Jinja source (tests and servers that need a known template).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(InputError):
    """The chat template could not be found, or not rendered for these messages."""


# A GGUF file without `tokenizer.chat_template` (Gemma-3-270M's, for one) gets a
# template only where its architecture fixes the chat format; llama.cpp renders
# it by name. Guessing anything else (e.g. ChatML for every "llama") taught a model
# the wrong format: it wrote the markers as text and never ended its turn.
ARCH_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}

# Control text of the common chat formats. In a sample that ran to max tokens, any
# of these means the model was shown a format it does not know and imitated it.
CONTROL_MARKERS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>",
                   "<|system|>", "<|end|>", "<|endoftext|>", "</s>", "<|EOT|>")


def control_text(text: str) -> str | None:
    """The first chat-format marker written out as text, if any."""
    hits = [(i, m) for m in CONTROL_MARKERS if (i := text.find(m)) >= 0]
    return min(hits)[1] if hits else None


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """A Jinja chat template (Hugging Face's format, as stored in GGUF files)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return _compile(self.source).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except Exception as e:  # jinja2 raises many types on bad templates or input
            raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e


class BuiltinTemplate:
    """One of llama.cpp's built-in chat formats, selected by name and rendered by
    `llama_chat_apply_template` (no Jinja)."""

    def __init__(self, name: str):
        names = builtin_names()
        if name not in names:
            raise TemplateError(f"unknown built-in chat template {name!r}; llama.cpp knows: {', '.join(names)}")
        self.name = name
        self.source = f"llama.cpp built-in: {name}"

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        import ctypes

        import llama_cpp

        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
        chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
        size = 2 * sum(len(r) + len(c) for r, c in keep) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(self.name.encode(), chat, len(keep), add_generation_prompt,
                                                    buf, size)
            if n < 0:
                raise TemplateError(f"llama.cpp could not apply its {self.name!r} template to these messages")
            if n <= size:
                return buf.raw[:n].decode("utf-8")
            size = n
        raise TemplateError(f"llama.cpp's {self.name!r} template output kept growing")


@lru_cache(maxsize=1)
def builtin_names() -> tuple[str, ...]:
    """The chat formats llama.cpp renders by name (chatml, llama3, gemma, ...)."""
    import ctypes

    import llama_cpp

    n = llama_cpp.llama_chat_builtin_templates(None, 0)
    arr = (ctypes.c_char_p * n)()
    llama_cpp.llama_chat_builtin_templates(arr, n)
    return tuple(sorted(a.decode() for a in arr))


def read_template(value: str) -> str:
    """Jinja source from `value`: the source itself, or a file holding it (a Jinja
    file, a Hugging Face tokenizer_config.json, or a .gguf file)."""
    import json
    from pathlib import Path

    if "{%" in value or "{{" in value:
        return value
    p = Path(value).expanduser()
    if not p.is_file():
        raise TemplateError(f"chat template {value!r} is neither Jinja source nor an existing file "
                            "(nor one of llama.cpp's built-in names)")
    if p.suffix == ".gguf":
        from ..flops import read_gguf_header

        source = read_gguf_header(p)[0].get("tokenizer.chat_template")
    elif p.name.endswith(".json"):
        try:
            source = json.loads(p.read_text()).get("chat_template")
        except (OSError, ValueError) as e:
            raise TemplateError(f"cannot read a chat template from {p}: {e}") from None
    else:
        source = p.read_text()
    if not isinstance(source, str) or not source.strip():
        raise TemplateError(f"{p} holds no chat template")
    return source


def missing_template_message(model: str, arch: str | None) -> str:
    return (f"{model} carries no chat template (no tokenizer.chat_template), and its architecture "
            f"({arch or 'unknown'}) has no single chat format to assume. Pass --chat-template NAME, one of "
            f"llama.cpp's built-in formats ({', '.join(builtin_names())}), or --chat-template FILE (a Jinja "
            "file, a tokenizer_config.json, or a .gguf that has one); with the engine directly, chat_template=...")
