"""Everything in a merged model's directory besides the weights: config.json, tokenizer files, README.md."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pymerge.errors import CheckpointError, MergeError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# A Hugging Face Hub repo id: "name" or "owner/name" (letters, digits, '-', '_', '.'; no leading '.' or '-').
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def write_config_json(src_config: Path | None, dst_dir: Path, torch_dtype: str) -> None:
    """Copy ``src_config`` into ``dst_dir/config.json`` with its dtype fields set to ``torch_dtype``.

    Sets top-level ``torch_dtype`` (always) and ``dtype`` (newer transformers' name, when present), and the
    ``torch_dtype``/``dtype`` of nested sub-configs at any depth (e.g. ``text_config``, or a vision tower's own
    ``text_config``) that have one. No-op without a source.
    """
    if not isinstance(getattr(torch, torch_dtype, None), torch.dtype):
        raise MergeError(f"config torch_dtype {torch_dtype!r} is not a torch dtype name (e.g. 'bfloat16')")
    if src_config is None:
        return
    try:
        config: Any = json.loads(Path(src_config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{src_config}: cannot read config as JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{src_config}: config must be a JSON object")
    config["torch_dtype"] = torch_dtype
    if "dtype" in config:
        config["dtype"] = torch_dtype
    _set_nested_dtypes(config, torch_dtype)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (Path(dst_dir) / "config.json").write_text(text, encoding="utf-8")


def _set_nested_dtypes(config: dict, torch_dtype: str) -> None:
    """The dtype fields a sub-config (a dict value, or a dict in a list, at any depth) already has."""
    stack = list(config.values())
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key in ("torch_dtype", "dtype"):
                if key in value:
                    value[key] = torch_dtype
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the tokenizer/generation files of ``src_dir`` that exist into ``dst_dir``; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            # copyfile follows symlinks (Hub cache files are links into a blob store): copy the content.
            shutil.copyfile(src, Path(dst_dir) / name)
            copied.append(name)
    return copied


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repo id rather than a local path."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not Path(name).exists()


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def write_model_card(
    dst_dir: Path, *, method: str, models: list[str], base_model: str | None, config_yaml: str
) -> None:
    """Write ``dst_dir/README.md``: a model card with front matter, the method, the inputs and the config."""
    # Values are written as JSON strings, which are valid YAML scalars whatever characters they contain.
    front = ["---"]
    if base_model is not None and _is_hub_id(base_model):
        front.append(f"base_model: {json.dumps(base_model)}")
    front += ["library_name: transformers", "tags:", "- merge", "- pymerge", "---"]

    body = [
        f"# {Path(dst_dir).name}",
        "",
        f"This model is a merge of pre-trained language models, made with pymerge using the **{method}** "
        "merge method.",
        "",
    ]
    if base_model is not None:
        body += [f"Base model: `{base_model}`", ""]
    body += ["## Models merged", ""]
    body += [f"- `{m}`" for m in models] or ["(none)"]
    fence = _fence(config_yaml)
    body += ["", "## Configuration", "", f"{fence}yaml", config_yaml.rstrip("\n"), fence, ""]
    (Path(dst_dir) / "README.md").write_text("\n".join(front + [""] + body), encoding="utf-8")
