"""The command line of the config-driven entry points (train, collect): the parser, and a reference of every
config field (type, value, docstring) generated from the dataclasses of config.py, so that `--help`
documents exactly what `section.field=value` accepts.

    ap = config_parser("python -m arcopo_fast.collect", __doc__, argv)   # --preset/--config/--print-config,
    ap.add_argument(...)                                                 # overrides, --log-level/--quiet
    args = ap.parse_args(argv)

The field docstrings are the string literals under each field in config.py (attribute docstrings, as in
torchtitan): they are read from the source with `ast`, once, and shown under the field in `--help`.
`--print-config` prints the resolved config as the YAML that runs save and `--config` reads.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import typing
from typing import Any

import yaml

from . import log
from .config import DEFAULT_PRESET, PRESETS, RewardEntry, TrainConfig, _deep_update

WIDTH = 110


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of a dataclass: the string literal right under each annotated field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _type_name(f: dataclasses.Field) -> str:
    tp = f.type  # config.py uses `from __future__ import annotations`: the annotation as written
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


def _value_text(value: Any) -> str:
    """A value as it is written after `section.field=` (YAML flow style)."""
    text = yaml.safe_dump(json.loads(json.dumps(value)), default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("\n...").strip()


def _entry_lines(key: str, f: dataclasses.Field, value: Any, default: Any, docs: dict[str, str]) -> list[str]:
    head = f"  {key}: {_type_name(f)} = {_value_text(value)}"
    if value != default:
        head += f"   (field default {_value_text(default)})"
    lines = [head]
    doc = docs.get(f.name)
    if doc:
        lines += textwrap.wrap(" ".join(doc.split()), WIDTH, break_on_hyphens=False, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(_plain(out)))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def preset_values(preset: str) -> dict[str, Any]:
    """The plain config dict of a preset over the field defaults, unvalidated (a 1.3B preset needs paths
    that `--help` should not ask for)."""
    base = json.loads(json.dumps(TrainConfig.to_dict(_unvalidated_default())))
    return _deep_update(base, PRESETS[preset]())


def _unvalidated_default() -> TrainConfig:
    cfg = object.__new__(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        object.__setattr__(cfg, f.name, f.default_factory())
    return cfg


def config_reference(preset: str = DEFAULT_PRESET) -> str:
    """Every config field: `section.field: type = value (under the preset)`, its field default when the
    preset changes it, and its docstring. Reward entries are listed as reward.rewards[].<key>."""
    values = preset_values(preset)
    lines = [
        f"config fields (override with section.field=value; values shown are those of --preset {preset}):",
    ]
    for sec in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[sec.name]
        docs, defaults = field_docs(cls), _defaults(cls)
        lines.append("")
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(cls):
            lines += _entry_lines(f"{sec.name}.{f.name}", f, values[sec.name][f.name], defaults[f.name], docs)
            if cls.__name__ == "RewardSection" and f.name == "rewards":
                entry_docs = field_docs(RewardEntry)
                entry_defaults = _defaults(RewardEntry)
                for ef in dataclasses.fields(RewardEntry):
                    d = f" = {_value_text(entry_defaults[ef.name])}" if ef.name in entry_defaults else " (required)"
                    head = f"    reward.rewards[].{ef.name}: {_type_name(ef)}{d}"
                    lines.append(head)
                    if entry_docs.get(ef.name):
                        lines += textwrap.wrap(" ".join(entry_docs[ef.name].split()), WIDTH, break_on_hyphens=False, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)


def config_yaml(cfg: TrainConfig) -> str:
    """The config as YAML: what runs save as config.yaml and what --config reads back."""
    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)


def _preset_of(argv: list[str] | None) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=DEFAULT_PRESET)
    known, _ = pre.parse_known_args(argv)
    return known.preset if known.preset in PRESETS else DEFAULT_PRESET


def config_parser(prog: str, doc: str | None, argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of an entry point that takes a training config: its own usage and description (`doc`),
    --preset, --config, --print-config, the section.field=value overrides, --log-level/--quiet, and the
    reference of every config field as the epilog of --help (values of the --preset found in argv)."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description=doc,
        epilog=config_reference(_preset_of(argv)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"named configuration (default: {DEFAULT_PRESET})")
    ap.add_argument("--config", metavar="FILE", help="a YAML/JSON file with config sections, applied over the preset")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config as YAML (readable by --config) and exit")
    ap.add_argument("overrides", nargs="*", metavar="section.field=value",
                    help="config overrides, applied last (every field is listed below)")
    log.add_arguments(ap)
    return ap
