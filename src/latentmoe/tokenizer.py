"""Text <-> token ids for a checkpoint directory: `tokenizer.json` run by the `tokenizers` library, the special tokens
and BOS rule of `tokenizer_config.json`, chat templates rendered in a sandbox, and a streaming-safe incremental decoder.

Loading follows the conventions of released HF-format checkpoints, so that they tokenize exactly as in their reference.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from datetime import datetime
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _Backend

from .config import read_json_object

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict ({"content": ..., ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    raise ValueError(f"tokenizer_config.json: a special token must be a string or an object with 'content', "
                     f"got {value!r}")


def _added_token(value: Any) -> AddedToken:
    if isinstance(value, dict):
        kw = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **kw)
    return AddedToken(value, special=True, normalized=False)


@lru_cache(maxsize=16)
def _compile_template(source: str):
    # Sandboxed, immutable environment with the same options and helpers as the reference implementation, so the
    # templates shipped with checkpoints render identically (trim_blocks/lstrip_blocks change whitespace).
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt text
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the settings of tokenizer_config.json and the chat template."""

    def __init__(self, backend: _Backend, config: dict | None = None, chat_template: str | None = None,
                 template_in_file: bool = False):
        self._raw = backend                          # as loaded; `save` writes this back unchanged
        self.config = dict(config or {})
        self._template_in_file = template_in_file
        self._tok = _Backend.from_str(backend.to_str())
        self._plain: _Backend | None = None
        self._special_id_set: dict[int, str] | None = None
        self._max_token_chars: int | None = None
        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            content = _token_content(self.config.get(key))
            if content is not None:
                self.special_tokens[key] = content
        # Special tokens named in the config but missing from tokenizer.json become added special tokens.
        extra = self.config.get("additional_special_tokens") or []
        if isinstance(self.config.get("extra_special_tokens"), list):
            extra = [*extra, *self.config["extra_special_tokens"]]
        wanted = [self.config[k] for k in SPECIAL_TOKEN_KEYS if self.config.get(k) is not None] + \
                 [t for t in extra if isinstance(t, (str, dict))]
        missing = [_added_token(t) for t in wanted if self._tok.token_to_id(_token_content(t)) is None]
        if missing:
            self._tok.add_special_tokens(missing)

        self.bos_token_id = self._id_of("bos_token")
        self.eos_token_id = self._id_of("eos_token")
        self.pad_token_id = self._id_of("pad_token")
        self.unk_token_id = self._id_of("unk_token")
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.add_eos_token = bool(self.config.get("add_eos_token", False))
        # An explicit add_bos_token/add_eos_token (or no post-processor at all) decides which special tokens
        # `encode` adds; otherwise the post-processor of tokenizer.json does.
        if "add_bos_token" in self.config or "add_eos_token" in self.config or self._tok.post_processor is None:
            self._set_post_processor()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # Byte-fallback tokens (<0xE4>...) decode as one run: a later byte can turn the whole run into U+FFFD.
        self.byte_fallback_ids = frozenset(
            i for i in (self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None
        ) if getattr(self._tok.model, "byte_fallback", False) else frozenset()

        if isinstance(chat_template, list):  # the named-templates form: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in chat_template}
            chat_template = named.get("default")
        self.chat_template = chat_template
        self._cleanup = bool(self.config.get("clean_up_tokenization_spaces", False)) and \
            type(self._tok.model).__name__ != "BPE"   # the clean-up corrupts BPE output, so it is never applied there

    def _id_of(self, key: str) -> int | None:
        content = self.special_tokens.get(key)
        return None if content is None else self._tok.token_to_id(content)

    def _set_post_processor(self) -> None:
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos = self.add_bos_token and bos is not None
        add_eos = self.add_eos_token and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = ([(bos, self.bos_token_id)] if add_bos else []) + ([(eos, self.eos_token_id)] if add_eos else [])
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # ---- loading and saving

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config: dict = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            config = read_json_object(cfg_file)
        # Legacy special_tokens_map.json fills in what tokenizer_config.json leaves unset.
        map_file = os.path.join(path, "special_tokens_map.json")
        if os.path.isfile(map_file):
            for key, value in read_json_object(map_file).items():
                if not config.get(key):
                    config[key] = value
        template, in_file = config.get("chat_template"), False
        tpl_file = os.path.join(path, TEMPLATE_FILE)
        if os.path.isfile(tpl_file):  # the newer separate file wins over the config key
            with open(tpl_file, encoding="utf-8") as f:
                template, in_file = f.read(), True
        try:
            backend = _Backend.from_file(tok_file)
        except Exception as e:   # the tokenizers library's own error: no file name, a Rust message
            raise ValueError(f"{tok_file}: corrupt tokenizer file ({str(e).splitlines()[0] if str(e) else e!r})") \
                from None
        try:
            return cls(backend, config, template, template_in_file=in_file)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{cfg_file}: invalid tokenizer settings ({e!r})") from None

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._raw.save(os.path.join(path, "tokenizer.json"))
        config = dict(self.config)
        config.pop("chat_template", None)
        if self.chat_template is not None:
            if self._template_in_file:
                with open(os.path.join(path, TEMPLATE_FILE), "w", encoding="utf-8") as f:
                    f.write(self.chat_template)
            else:
                config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    # ---- encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Many texts at once, encoded on all cores (a corpus, before training)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._cleanup else text

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: its vocabulary string is as long or longer (byte-level
        strings spell one byte per character). So a text of more than n times this has more than n tokens."""
        if self._max_token_chars is None:
            self._max_token_chars = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)
        return max(self._max_token_chars, 1)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs) -> str | list[int]:
        source = chat_template or self.chat_template
        if source is None:
            raise ValueError("this tokenizer has no chat template (no chat_template.jinja and no 'chat_template' "
                             "in tokenizer_config.json)")
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        render = _compile_template(source).render
        if not tokenize:
            return render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        # The message contents are rendered as placeholders first, to learn where each one lands in the text.
        marks = [f"\ue000{secrets.token_hex(8)}\ue001" for _ in messages]
        stand_ins = [{**m, "content": mark} if isinstance(m.get("content"), str) else m
                     for m, mark in zip(messages, marks)]
        skeleton = render(messages=stand_ins, add_generation_prompt=add_generation_prompt, **variables)
        text, spans = _fill(skeleton, marks, [m.get("content") for m in messages])
        if text is None:   # the template changes the contents: the plain rendering, spans unknown
            text = render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        # The template writes BOS itself where the model expects it, so no special tokens are added again.
        return self._encode_keeping_content_text(text, spans)

    def _encode_keeping_content_text(self, text: str, spans: list[tuple[int, int]] | None) -> list[int]:
        """`text` encoded with the template's special tokens as special tokens, but special-token text inside a
        message's content (`spans`) as plain text: a user who types the end-of-turn token must not end the turn.

        The tokenizer splits text at special tokens and encodes the pieces in between independently, so splitting
        at the template's special tokens only, and encoding the pieces with special-token matching off, gives the
        usual ids wherever no content holds special-token text.
        """
        enc = self._tok.encode(text, add_special_tokens=False)
        special = self._special_ids()   # id -> text; a token counts only where that text was written (not unk)
        found = [(i, enc.offsets[i]) for i, t in enumerate(enc.ids)
                 if t in special and text[enc.offsets[i][0]:enc.offsets[i][1]] == special[t]]
        forged = [o for _, o in found if spans is None or any(a < o[1] and o[0] < b for a, b in spans)]
        if not forged:
            return enc.ids
        if spans is None:
            raise ValueError("a message contains special-token text that this chat template cannot keep as text")
        plain = self._plain_backend()
        ids, pos = [], 0
        for i, (a, b) in found:
            if (a, b) in forged:
                continue
            if text[pos:a]:
                ids += plain.encode(text[pos:a], add_special_tokens=False).ids
            ids.append(enc.ids[i])
            pos = b
        if text[pos:]:
            ids += plain.encode(text[pos:], add_special_tokens=False).ids
        return ids

    def _special_ids(self) -> dict[int, str]:
        if self._special_id_set is None:
            self._special_id_set = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return self._special_id_set

    def _plain_backend(self) -> _Backend:
        """A copy of the backend that reads special-token text as text (its own object: encoding runs in threads)."""
        if self._plain is None:
            plain = _Backend.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)


def _fill(skeleton: str, marks: list[str], contents: list) -> tuple[str | None, list[tuple[int, int]] | None]:
    """The rendered text with each placeholder replaced by its content, and the contents' spans in it; (None, None)
    if a placeholder with string content is not found exactly once (the template transformed it)."""
    found: dict[str, list[int]] = {}
    for m in re.finditer("\ue000[0-9a-f]{16}\ue001", skeleton):
        found.setdefault(m.group(), []).append(m.start())
    where = []
    for mark, content in zip(marks, contents):
        if not isinstance(content, str):
            continue
        if len(found.get(mark, ())) != 1:
            return None, None
        where.append((found[mark][0], mark, content))
    out, spans, pos, length = [], [], 0, 0
    for at, mark, content in sorted(where):
        out += [skeleton[pos:at], content]
        length += at - pos
        spans.append((length, length + len(content)))
        length += len(content)
        pos = at + len(mark)
    out.append(skeleton[pos:])
    return "".join(out), spans


def _clean_up(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas for streaming.

    Decoding token by token is wrong for byte-level BPE (one character may span several tokens) and for decoders that
    drop a leading space at the start of a sequence. So each step decodes a short window of earlier tokens with and
    without the new ones and emits the difference, holding text back while it ends in an incomplete UTF-8 sequence
    (shown by the decoder as U+FFFD). The concatenated deltas plus `flush()` equal `decode(all_ids)`.
    """

    WINDOW = 6  # tokens of left context; enough for any merge or multi-byte character to be complete

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""           # everything emitted so far
        self._prefix = 0         # window start
        self._read = 0           # ids before this index are fully emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, new_ids: list[int] | int) -> str:
        if isinstance(new_ids, int):
            new_ids = [new_ids]
        self.ids.extend(new_ids)
        if not new_ids:
            return ""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        # The window's text must match the end of what was emitted. It may not when the window starts inside a
        # character or byte run (byte-fallback decoders turn a whole broken run into U+FFFD), and it must not be
        # empty: decoders strip a leading space from the first visible token, which then would be the new text.
        # Widening the window (at worst to the start) restores both.
        while self._prefix > 0 and (not prefix_text or not self.text.endswith(prefix_text)):
            self._prefix = max(0, self._prefix - max(self.WINDOW, self._read - self._prefix))
            prefix_text = self._decode(self.ids[self._prefix:self._read])
        if self.ids[-1] in self.tokenizer.byte_fallback_ids:
            return ""  # the byte run may still grow, and its text is only known once it ends
        full_text = self._decode(self.ids[self._prefix:])
        if full_text.endswith("\ufffd") or not full_text.startswith(prefix_text):
            return ""  # an incomplete character (or a window the decoder rewrote): wait for more tokens
        delta = full_text[len(prefix_text):]
        self._read = len(self.ids)
        self._prefix = max(0, self._read - self.WINDOW)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Text held back at the end of the stream (e.g. a truncated character, emitted as U+FFFD)."""
        full = self._decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        self._read = len(self.ids)
        self._prefix = max(0, self._read - self.WINDOW)
        return delta


# A chat template in the DeepSeek-V2-Chat format ("User: ...\n\nAssistant: ...<eos>"), for tokenizers trained here.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def train_bpe(texts: list[str], vocab_size: int = 512, chat_template: str | None = DEFAULT_CHAT_TEMPLATE) -> Tokenizer:
    """Train a small byte-level BPE with DeepSeek-V2's special tokens and config conventions (BOS added on encode)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)

    def token(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": token(BOS), "eos_token": token(EOS),
              "pad_token": token(EOS), "unk_token": None, "clean_up_tokenization_spaces": False,
              "model_max_length": 16384, "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    return Tokenizer(backend, config, chat_template)
