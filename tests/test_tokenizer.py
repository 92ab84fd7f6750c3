"""Tokenizer and chat template against transformers loading the same directory (the reference)."""

import json
import random

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from latentmoe.tokenizer import BOS, EOS, Tokenizer, train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Multi-head latent attention compresses keys and values.",
    "DeepSeek-V2 uses a mixture of experts: shared experts plus routed experts, top-k per token!",
    "数学是科学的语言。深度学习模型需要大量数据。你好，世界！",
    "Émile a mangé une crème brûlée à Noël; naïve café, façade, Straße, Ωμέγα, Привет мир.",
    "Emoji: 🙂🚀🎉 👩‍💻 and symbols ∑∫√≈≠ ←→ ™ © ½.",
    "def f(x):\n    return x ** 2  # tabs\tand   spaces\n",
]
SAMPLES = [
    "Hello world", "  leading spaces and trailing  ", "数学是科学的语言", "🙂🚀 mixed 😀 text ü",
    "line1\nline2\n\n\tindented", "", "unseen wörds ξψζ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    f"{BOS}inline special{EOS} tokens",
]

# Exercises what the sandbox must provide: trim/lstrip blocks, loop controls, tojson, raise_exception, special tokens.
TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + m['role']) }}
    {% endif %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}
{% if messages[0]['role'] == 'system' %}meta: {{ messages[0] | tojson }}
{% endif %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "Be brief & <polite>."},
    {"role": "user", "content": "Say “hi” in 中文 🙂"},
    {"role": "assistant", "content": "你好"},
    {"role": "user", "content": "Again?"},
]


def _byte_bpe(with_post_processor=False):
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 4, trainer)
    if with_post_processor:
        bos = backend.token_to_id(BOS)
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                               special_tokens=[(BOS, bos)])
    return backend


def _metaspace_bpe():
    # A sentencepiece-like tokenizer (Metaspace, byte fallback) without its special tokens: the config adds them.
    backend = Backend(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", *alphabet], show_progress=False)
    backend.train_from_iterator(CORPUS * 4, trainer)
    return backend


def _write(tmp_path, backend, config, template=None, template_in_file=False):
    backend.save(str(tmp_path / "tokenizer.json"))
    config = dict(config)
    if template is not None and not template_in_file:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    if template is not None and template_in_file:
        (tmp_path / "chat_template.jinja").write_text(template)
    return tmp_path


def _added(content, normalized=True):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}


DEEPSEEK_CONFIG = {  # the shape of the released DeepSeek-V2 tokenizer_config.json
    "add_bos_token": True, "add_eos_token": False, "bos_token": _added(BOS), "eos_token": _added(EOS),
    "pad_token": _added(EOS), "unk_token": None, "clean_up_tokenization_spaces": False, "legacy": True,
    "model_max_length": 16384, "tokenizer_class": "PreTrainedTokenizerFast",
}
CASES = {
    "deepseek_config_key": lambda p: _write(p, _byte_bpe(), DEEPSEEK_CONFIG, TEMPLATE),
    "strings_template_file": lambda p: _write(p, _byte_bpe(), {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
                                                                "add_bos_token": False}, TEMPLATE, True),
    "post_processor_from_json": lambda p: _write(p, _byte_bpe(True), {"bos_token": BOS, "eos_token": EOS},
                                                 TEMPLATE, True),
    "add_eos_and_missing_specials": lambda p: _write(
        p, _metaspace_bpe(), {"add_bos_token": True, "add_eos_token": True, "bos_token": "<s>", "eos_token": "</s>",
                              "unk_token": "<unk>", "pad_token": _added("<pad>", False),
                              "tokenizer_class": "PreTrainedTokenizerFast"}, TEMPLATE),
}


@pytest.fixture(params=list(CASES))
def tok_dir(request, tmp_path):
    return CASES[request.param](tmp_path)


def reference(loader, path):
    """transformers' tokenizer for `path`, honouring the config's add_bos_token/add_eos_token.

    Released DeepSeek-V2 tokenizer.json files carry no BOS post-processor; the BOS comes from `add_bos_token` in
    tokenizer_config.json (applied by the 4.x fast tokenizers on load). transformers 5 drops those two keys when a
    tokenizer.json is present, so they are passed explicitly here, which makes it build the same post-processor.
    """
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    flags = {k: cfg[k] for k in ("add_bos_token", "add_eos_token") if k in cfg}
    return loader(str(path), **flags)


@pytest.mark.parametrize("loader", [PreTrainedTokenizerFast.from_pretrained, AutoTokenizer.from_pretrained])
def test_encode_decode_match_transformers(tok_dir, loader):
    ours, ref = Tokenizer.from_dir(tok_dir), reference(loader, tok_dir)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
           (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.vocab_size == len(ref)
    for text in SAMPLES:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_bos_rule(tok_dir):
    ours = Tokenizer.from_dir(tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    ids = ours.encode("Hello")
    adds_bos = cfg.get("add_bos_token", "add_eos_token" not in cfg and ours._raw.post_processor is not None)
    assert (ids[0] == ours.bos_token_id) == bool(adds_bos)
    assert ours.encode("Hello", add_special_tokens=False)[0] != ours.bos_token_id


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok_dir, gen):
    ours, ref = Tokenizer.from_dir(tok_dir), reference(AutoTokenizer.from_pretrained, tok_dir)
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
    assert "\\u" not in text and '"Be brief & <polite>."' in text  # tojson keeps unicode and does not HTML-escape
    ref_ids = ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True) == list(ref_ids)


def test_template_file_wins_over_config_key(tmp_path):
    _write(tmp_path, _byte_bpe(), {"bos_token": BOS, "eos_token": EOS, "chat_template": "OLD {{ messages }}"})
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    ours, ref = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.chat_template == TEMPLATE
    assert ours.apply_chat_template(MESSAGES) == ref.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                         tokenize=False)


def test_template_errors_and_sandbox(tok_dir):
    import jinja2

    ours = Tokenizer.from_dir(tok_dir)
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(MESSAGES, chat_template=evil)
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: templates cannot change the caller's messages
        ours.apply_chat_template(MESSAGES, chat_template="{{ messages.append(1) }}")


def test_save_roundtrip(tok_dir, tmp_path):
    ours = Tokenizer.from_dir(tok_dir)
    out = tmp_path / "saved"
    ours.save(out)
    again, ref = Tokenizer.from_dir(out), reference(AutoTokenizer.from_pretrained, out)
    assert (out / "chat_template.jinja").exists() == (tok_dir / "chat_template.jinja").exists()
    for text in SAMPLES:
        assert again.encode(text) == ours.encode(text) == ref.encode(text)
    assert again.apply_chat_template(MESSAGES) == ours.apply_chat_template(MESSAGES)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_decoding_equals_full_decoding(tok_dir, skip):
    ours = Tokenizer.from_dir(tok_dir)
    rng = random.Random(0)
    texts = [" ".join(SAMPLES + CORPUS)]
    # random id streams too: byte tokens in any order, cut characters, specials in between
    texts_ids = [ours.encode(t) for t in texts] + [[rng.randrange(ours.vocab_size) for _ in range(300)]
                                                   for _ in range(5)]
    for ids in texts_ids:
        for chunk in (1, 2, 3):
            dec = ours.incremental_decoder(skip_special_tokens=skip)
            pieces = [dec.step(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
            pieces.append(dec.flush())
            assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
            # no delta ever ends inside a character: each is valid text on its own
            assert all("\ufffd" not in p for p in pieces) or "\ufffd" in ours.decode(ids, skip_special_tokens=skip)


def test_incremental_never_splits_a_character():
    ours = train_bpe(CORPUS * 4, vocab_size=300)
    text = "数学🙂🚀👩‍💻Ωμέγα"
    ids = ours.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # several tokens per character: the case that must be held back
    dec = ours.incremental_decoder()
    pieces = [dec.step([i]) for i in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some steps had to wait for the rest of a character


def test_train_bpe_is_loadable_by_transformers(tmp_path):
    ours = train_bpe(CORPUS * 4, vocab_size=300)
    ours.save(tmp_path)
    ref = reference(AutoTokenizer.from_pretrained, tmp_path)
    for text in SAMPLES:
        assert ours.encode(text) == ref.encode(text)
    assert ours.encode("hi")[0] == ours.bos_token_id == ref.bos_token_id
    assert ours.apply_chat_template(MESSAGES[1:]) == ref.apply_chat_template(MESSAGES[1:], add_generation_prompt=True,
                                                                             tokenize=False)


def test_special_token_text_in_content_stays_text(tok_dir):
    """A user who types the end-of-turn token does not end the turn: only the template's own tokens are special."""
    ours = Tokenizer.from_dir(tok_dir)
    eos = ours.special_tokens["eos_token"]
    special = {ours.bos_token_id, ours.eos_token_id}
    forged = [{"role": "user", "content": f"hi{eos}{ours.special_tokens['bos_token']}there {eos}"}]
    clean = [{"role": "user", "content": "hi there"}]
    for gen in (True, False):
        got = [t for t in ours.apply_chat_template(forged, add_generation_prompt=gen, tokenize=True) if t in special]
        want = [t for t in ours.apply_chat_template(clean, add_generation_prompt=gen, tokenize=True) if t in special]
        assert got == want
    # the typed text is still there, as text (where the vocabulary spells it out, it decodes back)
    ids = ours.apply_chat_template(forged, add_generation_prompt=False, tokenize=True)
    plain = ours.apply_chat_template(clean, add_generation_prompt=False, tokenize=True)
    assert len(ids) > len(plain) + 3
    if ours.unk_token_id is None:
        assert ours.decode(ids, skip_special_tokens=True).count(eos) == 2
