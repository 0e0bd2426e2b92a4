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

# Used only when a GGUF file carries no template (base models): ChatML, the
# most widely shared format among small open instruct models.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template could not be rendered for these messages."""


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
