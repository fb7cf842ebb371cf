"""Generate docs/config.md from the config schema and docs/cli.md from the CLI's argparse parser.

    python scripts/gen_docs.py            # write both files
    python scripts/gen_docs.py --check    # exit 1, naming each file that is out of date

config.md: every section and key of `blockdrop.core.schema.ExperimentConfig`, with its type (the
`Literal` choices spelled out), its default as a config file gets it (a section's own default,
e.g. `compress.alignment.train.epochs` is 10, not TrainConfig's 30) and the comment written next
to the field in schema.py (read with `tokenize`, so the source stays the one place to explain a
key). cli.md: every command of `blockdrop.cli.build_parser()`, its arguments and help texts.
Nothing here is formatted by argparse's help formatter, whose layout depends on the terminal
width and the Python version.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from blockdrop.cli import build_parser
from blockdrop.core import schema

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "config.md"
CLI_DOC = ROOT / "docs" / "cli.md"


# ---- config.md ------------------------------------------------------------------------------------

def field_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): comment} from a module's source: the full-line comments directly
    above a class-level annotated field, then the comment at the end of its line(s). The key
    (class name, "") holds the class's own docstring."""
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, the line is only a comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.lstrip().startswith("#"))
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        found[(node.name, "")] = " ".join((ast.get_docstring(node) or "").split())
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in comments and comments[line][1]:
                above.insert(0, comments[line][0])
                line -= 1
            after = [comments[n][0] for n in range(stmt.lineno, stmt.end_lineno + 1)
                     if n in comments and not comments[n][1]]
            found[(node.name, stmt.target.id)] = " ".join(above + after)
    return found


def yaml_value(value: Any) -> str:
    """A default as it would be written in a config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


_NAMES = {int: "integer", float: "number", str: "string", bool: "true / false"}


def type_text(tp: Any) -> str:
    """An annotation in the words of a YAML file: `int | None` -> "integer or null"."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        text = " or ".join(type_text(a) for a in args if a is not type(None))
        return text + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(f"`{yaml_value(a)}`" for a in args)
    if origin in (tuple, list):
        item = args[0] if args else Any
        return "list" if item is Any else f"list of {type_text(item)}s"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    if tp is Any:
        return "any"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@dataclasses.dataclass(frozen=True)
class Section:
    path: str  # "" for the top level, else "compress.alignment"
    cls: type
    defaults: Any  # the instance a config file starts from (None: the section is required)
    parent: str = ""  # the class whose field this section is


def walk_sections(cls: type, path: str = "", defaults: Any = None, parent: str = "") -> list[Section]:
    """The schema's sections, depth first in field order, each with the defaults it starts from."""
    sections = [Section(path, cls, defaults, parent)]
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            sections += walk_sections(tp, f"{path}.{f.name}" if path else f.name, sub, cls.__name__)
    return sections


def _default(section: Section, f: dataclasses.Field) -> str:
    if section.defaults is not None:
        return yaml_value(getattr(section.defaults, f.name))
    if f.default is not dataclasses.MISSING:
        return yaml_value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return yaml_value(f.default_factory())
    return "required"


TOP_LEVEL = "The file itself: its sections, and where a run writes its folder."


def render_config() -> str:
    comments = field_comments(Path(inspect.getsourcefile(schema)).read_text())
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by scripts/gen_docs.py from src/blockdrop/core/schema.py; do not edit by hand -->",
        "",
        "A config is a YAML file whose sections mirror the dataclasses of `src/blockdrop/core/schema.py`.",
        "Every key below can also be set on the command line with `--set KEY=VALUE` (the value is read as",
        "YAML, e.g. `--set compress.alignment.train.epochs=2`). Unknown keys are errors naming the key and",
        "its section. A section given in part keeps the defaults of the keys it does not name; the defaults",
        "below are those a config file starts from (a nested section's own defaults where they differ from",
        "its class's, e.g. `compress.alignment.train`). `null` is YAML's None.",
        "",
    ]
    for section in walk_sections(schema.ExperimentConfig):
        title = f"`{section.path}`" if section.path else "Top level"
        parent, _, name = section.path.rpartition(".")
        about = [comments.get((section.parent, name), "") if section.parent else "",
                 comments.get((section.cls.__name__, ""), "")]
        about = " ".join(text for text in about if text) or TOP_LEVEL
        out += [f"## {title}", "", f"{about} (`{section.cls.__name__}`)", ""]
        hints = get_type_hints(section.cls)
        rows, subsections = [], []
        for f in dataclasses.fields(section.cls):
            key = f"{section.path}.{f.name}" if section.path else f.name
            if dataclasses.is_dataclass(hints[f.name]):
                required = section.defaults is None and f.default_factory is dataclasses.MISSING
                subsections.append(f"`{key}`" + (" (required)" if required else ""))
                continue
            text = comments.get((section.cls.__name__, f.name), "")
            default = _default(section, f)
            default = default if default == "required" else f"`{_cell(default)}`"
            rows.append(f"| `{key}` | {_cell(type_text(hints[f.name]))} | {default} | {_cell(text)} |")
        if rows:
            out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
        if subsections:
            out += ["Sections: " + ", ".join(subsections) + ".", ""]
        moved = getattr(section.cls, "MOVED", {})
        if moved:
            pairs = "; ".join(f"`{old}` -> `{new}`" for old, new in moved.items())
            out += [f"Keys of earlier versions, refused with where they live now: {pairs}.", ""]
    return "\n".join(out).rstrip("\n") + "\n"


# ---- cli.md ---------------------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def walk_commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, help, parser) for every command and command group, in the order registered."""
    sub = _subparsers(parser)
    if sub is None:
        return
    for choice in sub._choices_actions:
        child = sub.choices[choice.dest]
        yield (*words, choice.dest), choice.help or "", child
        yield from walk_commands(child, (*words, choice.dest))


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and a.help is not argparse.SUPPRESS]


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest if not action.option_strings else action.dest.upper()


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _synopsis(words: tuple[str, ...], parser: argparse.ArgumentParser) -> str:
    parts = ["blockdrop", *words]
    for action in _arguments(parser):
        if not action.option_strings:
            name = _metavar(action)
            parts.append(f"{name} [{name} ...]" if action.nargs == "+" else name)
            continue
        text = action.option_strings[0] + (f" {_metavar(action)}" if _takes_value(action) else "")
        parts.append(text if action.required else f"[{text}]")
    sub = _subparsers(parser)
    if sub is not None:
        parts.append("{" + ",".join(c.dest for c in sub._choices_actions) + "} ...")
    return " ".join(parts)


def _value_text(action: argparse.Action) -> str:
    if not _takes_value(action):
        return "flag"
    kind = action.type
    if action.choices is not None:
        text = "one of " + ", ".join(f"`{c}`" for c in action.choices)
    elif kind is None:
        text = "text"
    elif kind is Path:
        text = "path"
    else:
        text = _NAMES.get(kind) or kind.__name__.strip("_").replace("_", " ")
    if action.metavar is not None and action.option_strings:
        text = f"`{action.metavar}`" + ("" if text == "text" else f", {text}")
    if action.nargs == "+":
        text = f"one or more, {text}"
    if isinstance(action, argparse._AppendAction):
        text += ", repeatable"
    return text


def _default_text(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if not _takes_value(action):
        return "off"
    if action.default is None or action.default == []:
        return "-"
    return f"`{action.default}`"


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:  # argparse's own expansion, e.g. %(default)s
        text = text % {**vars(action), "prog": prog}
    return text


def render_cli() -> str:
    parser = build_parser()
    out = [
        "# Command-line reference",
        "",
        "<!-- generated by scripts/gen_docs.py from src/blockdrop/cli.py; do not edit by hand -->",
        "",
        "`blockdrop` and `python -m blockdrop` are the same program; every command takes `--help`.",
        "A user error is one line, `blockdrop: error: ...`, naming the file, field or flag,",
        "and exits with status 2. `config` is a YAML file or the name of a shipped config",
        "(`src/blockdrop/configs/`; keys: [config.md](config.md)).",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    commands = list(walk_commands(parser))
    out += [f"| [`blockdrop {' '.join(w)}`](#{'-'.join(('blockdrop', *w))}) | {_cell(h)} |" for w, h, _ in commands]
    out.append("")
    for words, help_text, sub in commands:
        out += [f"## blockdrop {' '.join(words)}", "", help_text[:1].upper() + help_text[1:], ""]
        out += ["```", _synopsis(words, sub), "```", ""]
        arguments = _arguments(sub)
        if arguments:
            out += ["| argument | value | default | meaning |", "|---|---|---|---|"]
            for action in arguments:
                name = ", ".join(action.option_strings) if action.option_strings else _metavar(action)
                out.append(f"| `{name}` | {_cell(_value_text(action))} | {_cell(_default_text(action))} "
                           f"| {_cell(_help(action, sub.prog))} |")
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# ---- main -----------------------------------------------------------------------------------------

def outputs() -> dict[Path, str]:
    return {CONFIG_DOC: render_config(), CLI_DOC: render_cli()}


def stale_files() -> list[Path]:
    """The generated files whose text differs from what the code generates now."""
    return [path for path, text in outputs().items() if not path.is_file() or path.read_text() != text]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"{_shown(path)} is out of date: run python scripts/gen_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs().items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
