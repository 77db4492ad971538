"""
The tokenizer and the chat template: tokenizer.json through the `tokenizers` library, and the model's own jinja2
template rendered the way transformers renders it (same helpers, template variables such as enable_thinking).

    tok = Tokenizer("Qwen/Qwen2.5-7B-Instruct")        # a local folder or a Hub id (hub.py), at a revision
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 7 times 8?"}])
"""

import json
import os
from datetime import datetime

from hub import resolve
from model import Config, load_config


def compile_template(source: str):
    """A chat template compiled the way transformers does: sandboxed jinja2 with the same helpers."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    # the helpers transformers gives templates: JSON without HTML escaping, errors, today's date (Llama 3.1)
    env.filters["tojson"] = lambda x, ensure_ascii=False, **kw: json.dumps(x, ensure_ascii=ensure_ascii, **kw)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """tokenizer.json through the `tokenizers` library; the chat template rendered by jinja2 as transformers does."""

    def __init__(self, name_or_path: str, revision: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = resolve(name_or_path, revision)
        self.tok = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        tc_path = os.path.join(path, "tokenizer_config.json")
        tc = json.loads(open(tc_path, encoding="utf-8").read()) if os.path.exists(tc_path) else {}
        special = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731 (str or AddedToken dict)
        # the special tokens a template may name ({{ bos_token }}, ...), as transformers passes them
        names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        self.special_tokens = {n: special(tc[n]) for n in names if tc.get(n) is not None}
        self.bos_token, self.eos_token = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_path):  # transformers >= 4.47 saves the template beside the config
            template = open(jinja_path, encoding="utf-8").read()
        self.chat_template, self.template = template, None  # the source, and its compiled form once used
        cfg = load_config(path) if os.path.exists(os.path.join(path, "config.json")) else Config()
        self.stop_ids = list(cfg.eos_token_id)
        if self.eos_token is not None and self.tok.token_to_id(self.eos_token) not in self.stop_ids:
            self.stop_ids.append(self.tok.token_to_id(self.eos_token))
        pad = self.special_tokens.get("pad_token")
        self.pad_id = self.tok.token_to_id(pad) if pad else (self.stop_ids[0] if self.stop_ids else 0)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **template_vars) -> str:
        """The conversation as text; template_vars reach the template as transformers' kwargs do (enable_thinking)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
        if self.template is None:  # compile once: evaluation renders thousands of prompts
            self.template = compile_template(self.chat_template)
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **template_vars}
        )

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_vars
    ) -> list[int]:
        """Token ids of the rendered conversation (special tokens come from the text, as in transformers)."""
        return self.encode(self.render(messages, add_generation_prompt, **template_vars))
