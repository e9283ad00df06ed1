"""What `melt-train show-config` prints: every field of a run config with its default and meaning.

The meanings are read from the config dataclasses themselves (train/config.py, train/pipeline.py,
train/optimizer.py, melt_jax/sharding.py): each section's docstring, and for a field the comment on its
line and the comment lines right above it. A field documented only in its section's docstring shows its
default alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import textwrap

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")
_COMMENT_LINE = re.compile(r"^\s+#\s?(.*)$")


def field_comments(cls) -> dict[str, str]:
    """{field name: its comment} of the dataclass `cls`, from its source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments, above = {}, []
    for line in lines:
        comment = _COMMENT_LINE.match(line)
        if comment:
            above.append(comment.group(1).strip())
            continue
        match = _FIELD_LINE.match(line)
        if match and match.group(1) in names and match.group(1) not in comments:
            text = " ".join([*above, (match.group(2) or "").replace("noqa", "").strip()]).strip()
            if text:
                comments[match.group(1)] = text
        above = []
    return comments


def _default_text(value) -> str:
    return json.dumps(value) if isinstance(value, (str, bool, int, float)) or value is None else repr(value)


def describe(config, prefix: str = "", width: int = 100) -> list[str]:
    """Lines naming every field of the dataclass instance `config` (nested sections flattened as
    `section.field`), its value there (the default of the command) and its meaning."""
    cls = type(config)
    doc = inspect.getdoc(cls) or ""
    title = prefix.rstrip(".") or cls.__name__
    lines = [f"[{title}]"]
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += textwrap.wrap(" ".join(doc.split()), width, initial_indent="  ", subsequent_indent="  ")
    comments = field_comments(cls)
    sections = []
    for field in dataclasses.fields(cls):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            sections.append((value, f"{prefix}{field.name}."))
            continue
        lines.append(f"  {prefix}{field.name} = {_default_text(value)}")
        if field.name in comments:
            lines += textwrap.wrap(comments[field.name], width, initial_indent="      ", subsequent_indent="      ")
    for value, section_prefix in sections:
        lines += ["", *describe(value, section_prefix, width)]
    return lines


def show_config(kind: str) -> str:
    """The text of `melt-train show-config KIND`: 'stage' (TrainConfig) or 'pipeline' (PipelineConfig)."""
    from melt_jax.model.config import preset_names

    from .config import STAGES, TrainConfig
    from .pipeline import PipelineConfig

    config = PipelineConfig() if kind == "pipeline" else TrainConfig()
    head = [
        f"Fields of `melt-train {kind}` with their defaults; set them with field=value "
        "(a section's field as section.field) or in a --config JSON/YAML file.",
        f"Stages: {', '.join(STAGES)}. Model presets (model=): {', '.join(preset_names())} "
        "(the MELT ones for init_from= on `melt-train compile`).",
        "",
    ]
    return "\n".join(head + describe(config))
