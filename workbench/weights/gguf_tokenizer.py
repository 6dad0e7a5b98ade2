"""The tokenizer of a Hugging Face folder as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

Read from the folder's own files, without transformers: `tokenizer.json` (vocabulary, merges, added
tokens, pre-tokenizer, post-processor), `tokenizer_config.json` (special tokens, `add_bos_token`, the
chat template), `chat_template.jinja` / `chat_template.json` / `additional_chat_templates/` (where
transformers writes templates now) and `config.json` (special token ids the tokenizer files leave out).

Only byte-level BPE vocabularies are written (GPT-2 style, GGUF `tokenizer.ggml.model = "gpt2"`): SmolLM,
Llama-3, Qwen2 and what `wb` trains from them. llama.cpp splits text before BPE with one of a fixed set
of regexes, named by `tokenizer.ggml.pre`; the name is chosen here from the pre-tokenizer that
`tokenizer.json` states (llama.cpp's converter instead hashes the tokenization of a test string), and a
pre-tokenizer that matches none of the known ones is refused rather than written under a wrong name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io.jsonfile import read_json

# GGUF token types (gguf.TokenType), as llama.cpp reads them.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# The split regexes of the tokenizers `wb` meets, as their tokenizer.json files spell them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


@dataclass
class GGUFVocab:
    """Everything `tokenizer.*` in the GGUF file says, plus what the Modelfile needs."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # "bos"/"eos"/"unk"/"pad" -> id, those the folder states
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    named_templates: dict[str, str] = field(default_factory=dict)
    padded: int = 0  # ids with no token in tokenizer.json, written as [PAD<id>] (UNUSED)
    files: list[Path] = field(default_factory=list)  # the files read, for export.json

    def token(self, kind: str) -> str | None:
        """The text of the bos/eos/unk/pad token, or None."""
        index = self.special_ids.get(kind)
        return None if index is None else self.tokens[index]

    def summary(self) -> dict:
        return {
            "model": self.model,
            "pre": self.pre,
            "tokens": len(self.tokens),
            "padded": self.padded,
            "merges": len(self.merges),
            "control_tokens": sum(t == CONTROL for t in self.token_types),
            "user_defined_tokens": sum(t == USER_DEFINED for t in self.token_types),
            **{f"{kind}_token_id": self.special_ids.get(kind) for kind in SPECIAL_KINDS},
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "chat_template": self.chat_template is not None,
            "named_chat_templates": sorted(self.named_templates),
        }

    def add_to(self, writer) -> None:
        """Write the `tokenizer.*` keys with a gguf.GGUFWriter."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind in SPECIAL_KINDS:
            if kind in self.special_ids:
                adders[kind](self.special_ids[kind])
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.named_templates:
            choices = [{"name": name, "template": text} for name, text in self.named_templates.items()]
            if self.chat_template is not None:
                choices.insert(0, {"name": "default", "template": self.chat_template})
            writer.add_chat_template(choices)
        elif self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def read_vocab(folder: Path, vocab_size: int, config: dict) -> GGUFVocab:
    """The folder's tokenizer as GGUF metadata for a model whose embedding has `vocab_size` rows."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        what = "tokenizer.model (SentencePiece)" if (folder / "tokenizer.model").is_file() else "no tokenizer.json"
        raise WorkbenchError(f"the folder has {what}; export-gguf needs a byte-level BPE tokenizer.json "
                             "(save the tokenizer with transformers' fast tokenizer)", folder)
    data = _object(read_json(path, "tokenizer.json"), "tokenizer.json", path)
    model = _object(data.get("model"), "tokenizer.json's model", path)
    kind = model.get("type")
    if kind != "BPE":
        raise WorkbenchError(f"tokenizer.json has a {kind!r} model; export-gguf writes byte-level BPE tokenizers only",
                             path)
    if model.get("byte_fallback"):
        raise WorkbenchError("tokenizer.json is a SentencePiece-style BPE (byte_fallback); export-gguf writes "
                             "byte-level (GPT-2 style) BPE tokenizers only", path)
    decoder = data.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        shown = decoder.get("type") if isinstance(decoder, dict) else decoder
        raise WorkbenchError(f"tokenizer.json's decoder is {shown!r}, not ByteLevel; export-gguf writes byte-level "
                             "BPE tokenizers only", path)
    pre = pre_tokenizer_name(data.get("pre_tokenizer"), path)
    normalizer = data.get("normalizer")
    if normalizer is not None and not (pre == "qwen2" and normalizer == {"type": "NFC"}):
        shown = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise WorkbenchError(f"tokenizer.json has a {shown!r} normalizer, which llama.cpp's {pre!r} tokenizer does not "
                             "apply; not exported", path)

    tokens, types, added = _token_table(model, data.get("added_tokens", []), vocab_size, path)
    merges = _merges(model.get("merges"), path)
    config_path = folder / "tokenizer_config.json"
    tok_config = _object(read_json(config_path, "tokenizer_config.json"), "tokenizer_config.json", config_path) \
        if config_path.is_file() else {}
    index = {text: i for i, text in enumerate(tokens)}
    special_ids = _special_ids(tok_config, config, index, added, config_path)
    add_bos, add_eos = _add_special(tok_config, data.get("post_processor"), tokens, special_ids, path)
    template, named, template_files = chat_templates(folder, tok_config)
    files = [path] + ([config_path] if config_path.is_file() else []) + template_files
    return GGUFVocab(model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=merges, special_ids=special_ids,
                     add_bos=add_bos, add_eos=add_eos, chat_template=template, named_templates=named,
                     padded=sum(t == UNUSED for t in types), files=files)


def pre_tokenizer_name(pre, path: Path) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the pre-tokenizer tokenizer.json states."""

    def byte_level(step, regex: bool) -> bool:
        return (isinstance(step, dict) and step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
                and bool(step.get("use_regex", True)) == regex)

    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list):
        steps = [steps]
    if len(steps) == 1 and byte_level(steps[0], regex=True):
        return "gpt-2"  # GPT-2's own split regex, inside ByteLevel
    if len(steps) == 2 and byte_level(steps[1], regex=True) and isinstance(steps[0], dict) \
            and steps[0].get("type") == "Digits" and steps[0].get("individual_digits"):
        return "smollm"  # every digit on its own, then GPT-2's regex
    if len(steps) == 2 and byte_level(steps[1], regex=False) and isinstance(steps[0], dict) \
            and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated" \
            and not steps[0].get("invert"):
        pattern = steps[0].get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex in SPLIT_NAMES:
            return SPLIT_NAMES[regex]
        raise WorkbenchError(f"tokenizer.json splits text with a regex llama.cpp has no name for ({str(regex)[:60]!r}…); "
                             "not exported (known: GPT-2, SmolLM, Llama-3, Qwen2)", path)
    shown = "+".join(str(s.get("type")) if isinstance(s, dict) else repr(s) for s in steps)
    raise WorkbenchError(f"tokenizer.json's pre-tokenizer ({shown}) is not one llama.cpp has a name for; not exported "
                         "(known: GPT-2, SmolLM, Llama-3, Qwen2)", path)


def _object(value, what: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise WorkbenchError(f"{what} is not a JSON object", path)
    return value


def _token_table(model: dict, added_tokens, vocab_size: int, path: Path) -> tuple[list[str], list[int], dict[str, int]]:
    """(tokens by id, their GGUF types, added token -> id); ids with no token become [PAD<id>] (UNUSED)."""
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise WorkbenchError("tokenizer.json's model has no vocabulary", path)
    if not isinstance(added_tokens, list):
        raise WorkbenchError("tokenizer.json's added_tokens is not a list", path)
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size

    def place(text, index, kind: int) -> None:
        if not isinstance(text, str) or isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise WorkbenchError(f"tokenizer.json has a bad token entry {text!r}: {index!r}", path)
        if index >= vocab_size:
            raise WorkbenchError(f"tokenizer.json has token {text!r} with id {index:,}, but the model's embedding has "
                                 f"{vocab_size:,} rows (config.json vocab_size)", path)
        tokens[index] = text
        types[index] = kind

    for text, index in vocab.items():
        place(text, index, NORMAL)
    added: dict[str, int] = {}
    for entry in added_tokens:
        if not isinstance(entry, dict):
            raise WorkbenchError("tokenizer.json has an added token that is not an object", path)
        text, index = entry.get("content"), entry.get("id")
        place(text, index, CONTROL if entry.get("special") else USER_DEFINED)
        added[text] = index
    names = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        twice = next(t for t in names if t in seen or seen.add(t))
        raise WorkbenchError(f"tokenizer.json gives the token {twice!r} two ids", path)
    return names, types, added


def _merges(merges, path: Path) -> list[str]:
    """Merges as GGUF stores them: "left right" (tokenizer.json writes either that or [left, right])."""
    if not isinstance(merges, list):
        raise WorkbenchError("tokenizer.json's BPE model has no merges list", path)
    out = []
    for merge in merges:
        if isinstance(merge, str) and merge.count(" ") == 1:
            out.append(merge)
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) and " " not in p for p in merge):
            out.append(f"{merge[0]} {merge[1]}")
        else:
            raise WorkbenchError(f"tokenizer.json has a merge GGUF cannot store: {merge!r}", path)
    return out


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_ids(tok_config: dict, config: dict, index: dict[str, int], added: dict[str, int],
                 path: Path) -> dict[str, int]:
    """bos/eos/unk/pad ids: the tokenizer's own tokens first, config.json's `*_token_id` where it has none."""
    ids: dict[str, int] = {}
    for kind in SPECIAL_KINDS:
        text = _token_text(tok_config.get(f"{kind}_token"))
        if text is not None:
            if text not in index:
                raise WorkbenchError(f"tokenizer_config.json names {kind}_token {text!r}, which is not in the vocabulary",
                                     path)
            ids[kind] = added.get(text, index[text])
            continue
        fallback = config.get(f"{kind}_token_id")
        if isinstance(fallback, list) and fallback:  # some configs list several eos ids; llama.cpp takes one
            fallback = fallback[0]
        if isinstance(fallback, int) and not isinstance(fallback, bool) and 0 <= fallback < len(index):
            ids[kind] = fallback
    return ids


def _add_special(tok_config: dict, post, tokens: list[str], ids: dict[str, int], path: Path) -> tuple[bool, bool]:
    """(add_bos, add_eos): tokenizer_config.json's flags, else what the post-processor's template adds."""
    before: list[str] = []
    after: list[str] = []
    processors = post.get("processors", []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for processor in processors:
        if isinstance(processor, dict) and processor.get("type") == "TemplateProcessing":
            seen_sequence = False
            for piece in processor.get("single") or []:
                if isinstance(piece, dict) and "Sequence" in piece:
                    seen_sequence = True
                elif isinstance(piece, dict) and isinstance(piece.get("SpecialToken"), dict):
                    (after if seen_sequence else before).append(piece["SpecialToken"].get("id"))
    flags = []
    for kind, found, key in (("bos", before, "add_bos_token"), ("eos", after, "add_eos_token")):
        stated = tok_config.get(key)
        if isinstance(stated, bool):
            flags.append(stated)
            continue
        text = tokens[ids[kind]] if kind in ids else None
        if any(token != text for token in found):
            raise WorkbenchError(f"tokenizer.json's post-processor adds {found} around each text; llama.cpp can add only "
                                 f"the {kind.upper()} token there; not exported", path)
        flags.append(bool(found))
    if flags[0] and "bos" not in ids:
        raise WorkbenchError("the tokenizer adds a BOS token but names none", path)
    if flags[1] and "eos" not in ids:
        raise WorkbenchError("the tokenizer adds an EOS token but names none", path)
    return flags[0], flags[1]


def chat_templates(folder: Path, tok_config: dict) -> tuple[str | None, dict[str, str], list[Path]]:
    """(default template, named ones, files read), where transformers looks for them, in its order.

    `chat_template.jinja` (what transformers writes now) wins over `chat_template.json` and over
    `tokenizer_config.json`'s `chat_template` (a string, or a list of {name, template});
    `additional_chat_templates/<name>.jinja` adds named ones.
    """
    files: list[Path] = []
    default: str | None = None
    named: dict[str, str] = {}
    value = tok_config.get("chat_template")
    if isinstance(value, str):
        default = value
    elif isinstance(value, list):
        for choice in value:
            if isinstance(choice, dict) and isinstance(choice.get("name"), str) and isinstance(choice.get("template"), str):
                if choice["name"] == "default":
                    default = choice["template"]
                else:
                    named[choice["name"]] = choice["template"]
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        loaded = read_json(json_file, "chat_template.json")
        if isinstance(loaded, dict) and isinstance(loaded.get("chat_template"), str):
            default = loaded["chat_template"]
            files.append(json_file)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        default = _read_text(jinja)
        files.append(jinja)
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            named[file.stem] = _read_text(file)
            files.append(file)
    return default, named, files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"cannot read the chat template: {exc}", path) from None
