"""Checks that README.md and docs/*.md agree with the repository (tests/test_docs.py runs them).

Four checks, each a function `(markdown file, repository root) -> list of failures`, every
failure "FILE:LINE: what is wrong":

  check_links      every relative link or image ([text](path#anchor), [text](#anchor),
                   [id]: path, <img src=...>, <a href=...>) names a file or folder that exists
                   (relative to the page; "/x" from the root), and every #anchor into a .md
                   page is one of its GitHub heading anchors (or an <a id/name>).
  check_configs    every configs/<name>.py named exists, and builds: its get_config(arg) with the
                   arg shown (configs/X.py:arg) or with None.
  check_modules    every `python -m beit_jax.X` names a module or package (with __main__.py)
                   of the file tree (nothing imported).
  check_overrides  every --config.a.b names a field the config of its command has (and that
                   the command line can set: no plain None on the way or at the end).

What counts as a command: a line of a fenced code block (trailing backslashes join lines;
&&, ||, ; and | split them; # comments dropped), an inline code span, or a line of prose
outside both. Which config a command's overrides go to: its --config=PATH[:arg]; in code, a
bare configs/X.py[:arg] token too (`configs/beit_large.py --config.model.remat=True` in a
table); without either, any config of configs/ built with its defaults must have the field.

Not checked: placeholders (UPPERCASE names: configs/NAME.py, python -m beit_jax.X,
--config.FIELD, --config=$CONFIG; one-letter paths: --config.a.b; <config>); overrides of
--config=configs/from_workdir.py:DIR (a past run's config.json) and of config files outside
configs/ and tests/ (the user's own); http(s), mailto and other scheme links; anchors into
files other than .md (GitHub's #L10 line anchors).

Run `python -m tests.docs_check [FILE.md ...]` from the root to print the failures of every
page (README.md and docs/*.md by default).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import pathlib
import re
import sys
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Configs that are not recipes: no get_config, or one that needs a past run (from_workdir).
NOT_BUILT = ("__init__", "common", "from_workdir")


def markdown_files(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
  """README.md and docs/*.md (those that exist)."""
  files = [root / "README.md"] if (root / "README.md").exists() else []
  return files + sorted((root / "docs").glob("*.md"))


# ------------------------------------------------------------------------------------------
# Parsing: fenced code blocks, inline code spans, prose.

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")  # indented too: fences in list items


@dataclasses.dataclass
class Unit:
  """A piece of text that is read as one command: its line (1-based), text and kind."""

  line: int
  text: str
  kind: str  # "block" (fenced code), "span" (inline code) or "prose"


@dataclasses.dataclass
class Page:
  prose: str  # the file with fenced code blocks blanked (newlines kept)
  prose_nocode: str  # ... and inline code spans blanked to "x"s (same length)
  units: list[Unit]


def _line_of(text: str, offset: int) -> int:
  return text.count("\n", 0, offset) + 1


def _code_spans(text: str):
  """(start, end, content) of each inline code span: a run of n backticks to the next run of
  exactly n, not across a blank line (CommonMark)."""
  spans, i = [], 0
  for m in re.finditer(r"`+", text):
    if m.start() < i:
      continue
    n = len(m.group())
    close = re.compile(r"(?<!`)`{%d}(?!`)" % n)
    c = close.search(text, m.end())
    if c and not re.search(r"\n[ \t]*\n", text[m.end() : c.start()]):
      spans.append((m.start(), c.end(), text[m.end() : c.start()]))
      i = c.end()
  return spans


def _split_commands(line: str) -> list[str]:
  line = re.sub(r"(^|\s)#.*", "", line)  # shell comments
  return [part for part in re.split(r"\s*(?:&&|\|\||;)\s*|\s\|\s", line) if part.strip()]


def parse(text: str) -> Page:
  lines = text.split("\n")
  prose_lines, units = [], []
  fence = None
  pending, pending_line = "", 0
  for number, line in enumerate(lines, 1):
    if fence is None:
      m = _FENCE.match(line)
      if m:
        fence = m.group(1)
        prose_lines.append("")
        continue
      prose_lines.append(line)
      continue
    prose_lines.append("")
    if re.match(r"^\s*%s%s*\s*$" % (re.escape(fence), re.escape(fence[0])), line):
      fence = None
      if pending:
        units += [Unit(pending_line, c, "block") for c in _split_commands(pending)]
        pending = ""
      continue
    if not pending:
      pending_line = number
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    units += [Unit(pending_line, c, "block") for c in _split_commands(pending + line)]
    pending = ""
  prose = "\n".join(prose_lines)
  chars = list(prose)
  for start, end, content in _code_spans(prose):
    units.append(Unit(_line_of(prose, start), " ".join(content.split()), "span"))
    for k in range(start, end):
      if chars[k] != "\n":
        chars[k] = "x"
  prose_nocode = "".join(chars)
  for number, line in enumerate(prose_nocode.split("\n"), 1):
    if "--config" in line or "configs/" in line or "beit_jax" in line:
      units += [Unit(number, line, "prose")]
  units.sort(key=lambda u: u.line)
  return Page(prose, prose_nocode, units)


@functools.lru_cache(maxsize=None)
def _read(path: pathlib.Path) -> Page:
  return parse(path.read_text(encoding="utf-8"))


def _display(path: pathlib.Path, root: pathlib.Path) -> str:
  try:
    return str(path.resolve().relative_to(root.resolve()))
  except ValueError:
    return str(path)


# ------------------------------------------------------------------------------------------
# 1. Links and anchors.


def _plain(markdown: str) -> str:
  """The text of markdown outside code: links and images -> their text, no HTML tags,
  emphasis, escapes or entities."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
  text = re.sub(r"<[^>]+>", "", text)
  text = text.replace("*", "")
  text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_, not snake_case
  text = re.sub(r"&[a-zA-Z]+;|&#\d+;", "", text)
  return re.sub(r"\\(.)", r"\1", text)


def github_anchor(heading: str) -> str:
  """The id GitHub gives a heading: its text as rendered (no markup), lowercase, without
  punctuation other than '-' and '_', each space a '-'."""
  parts, last = [], 0
  for start, end, content in _code_spans(heading):  # code: its text as is
    parts += [_plain(heading[last:start]), content]
    last = end
  text = "".join(parts + [_plain(heading[last:])])
  text = re.sub(r"[^\w\- ]", "", text.strip().lower())
  return text.replace(" ", "-")


def anchors(page: Page) -> set[str]:
  """Every heading anchor of a page (duplicates numbered -1, -2, ... as GitHub does), and
  every <a id=...>/<a name=...> and id=... of HTML."""
  found, seen = set(), {}
  lines = page.prose.split("\n")
  headings = []
  for i, line in enumerate(lines):
    m = re.match(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$", line)
    if m:
      headings.append(m.group(2) or "")
    elif (
      i > 0
      and re.match(r"^ {0,3}(=+|-+)[ \t]*$", line)
      and lines[i - 1].strip()
      and not lines[i - 1].lstrip().startswith(("#", "|", "-", "*", ">"))
      and not re.match(r"^ {0,3}(=+|-+)[ \t]*$", lines[i - 1])
    ):
      headings.append(lines[i - 1].strip())  # setext heading
  for heading in headings:
    slug = github_anchor(heading)
    if slug in seen:
      seen[slug] += 1
      found.add(f"{slug}-{seen[slug]}")
    else:
      seen[slug] = 0
      found.add(slug)
  found.update(re.findall(r"""<[^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""", page.prose))
  return found


# [text](target "title"): text may hold one level of [brackets]; target may be <in angles>.
_LINK = re.compile(
  r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*(<[^>]*>|[^\s)]*)"
  r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
_REF_DEF = re.compile(r"^ {0,3}\[([^\]]+)\]:\s*(<[^>]*>|\S+)", re.M)
_HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)


def links(page: Page) -> list[tuple[int, str]]:
  """(line, target) of each link, image and link reference definition outside code."""
  text = page.prose_nocode
  found = [(m.start(3), m.group(3).strip("<>")) for m in _LINK.finditer(text)]
  found += [(m.start(2), m.group(2).strip("<>")) for m in _REF_DEF.finditer(text)]
  found += [(m.start(1), m.group(1)) for m in _HTML_LINK.finditer(text)]
  return sorted((_line_of(text, offset), target) for offset, target in found)


def check_links(md: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
  page, name, failures = _read(md), _display(md, root), []
  for line, target in links(page):
    where = f"{name}:{line}: link ({target})"
    if not target:
      failures.append(f"{where}: empty target")
      continue
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
      continue  # http:, https:, mailto:, ...
    path_part, _, anchor = target.partition("#")
    path_part = urllib.parse.unquote(path_part)
    if not path_part:
      dest, dest_page = md, page
    else:
      dest = root / path_part.lstrip("/") if path_part.startswith("/") else md.parent / path_part
      if not dest.exists():
        failures.append(f"{where}: {_display(dest, root)} does not exist")
        continue
      dest_page = _read(dest) if dest.is_file() and dest.suffix == ".md" else None
    if anchor and dest_page is not None:
      anchor = urllib.parse.unquote(anchor)
      known = anchors(dest_page)
      if anchor not in known:
        close = difflib.get_close_matches(anchor, sorted(known), n=1)
        hint = f" (did you mean #{close[0]}?)" if close else ""
        failures.append(
          f"{where}: {_display(dest, root)} has no heading with anchor #{anchor}{hint}"
        )
  return failures


# ------------------------------------------------------------------------------------------
# 2. Configs.

# A config file named: `--config=PATH[:arg]` (flag set) or a bare configs/X.py[:arg].
_CONFIG_FLAG = re.compile(r"""--config=["']?(?P<path>[^\s:"'`]+)(?::(?P<arg>[^\s"'`]*))?""")
_CONFIG_NAMED = re.compile(
  r"(?<![\w./-])configs/(?P<name>[A-Za-z0-9_]+)\.py(?![\w.])(?::(?P<arg>[^\s\"'`]*))?"
)


def _clean_arg(arg: str | None, kind: str) -> str | None:
  if arg and kind == "prose":
    arg = re.sub(r"[.,;)]+$", "", arg)
  return arg or None


@functools.lru_cache(maxsize=None)
def build_config(root: pathlib.Path, module_path: str, arg: str | None):
  """`get_config(arg)` of the config file at root/module_path (e.g. 'configs/beit_base.py'),
  imported as a module of the repository; (config, None) or (None, the error)."""
  if str(root) not in sys.path:
    sys.path.insert(0, str(root))
  module_name = module_path[: -len(".py")].replace("/", ".")
  try:
    module = importlib.import_module(module_name)
    config = module.get_config(arg)
  except Exception as e:  # pylint: disable=broad-except: reported, with its type
    return None, f"{type(e).__name__}: {e}"
  if config is None:
    return None, "get_config returned None"
  return config, None


def _config_label(path: str, arg: str | None) -> str:
  return f"{path}:{arg}" if arg else path


def check_configs(md: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
  page, name, failures, reported = _read(md), _display(md, root), [], set()
  for unit in page.units:
    for m in _CONFIG_NAMED.finditer(unit.text):
      if m.group("name").isupper():
        continue  # a placeholder: configs/NAME.py
      path = f"configs/{m.group('name')}.py"
      arg = _clean_arg(m.group("arg"), unit.kind)
      if (path, arg) in reported:
        continue
      reported.add((path, arg))
      if not (root / path).is_file():
        close = difflib.get_close_matches(
          m.group("name"), [p.stem for p in (root / "configs").glob("*.py")], n=1
        )
        hint = f" (did you mean configs/{close[0]}.py?)" if close else ""
        failures.append(f"{name}:{unit.line}: {path} does not exist{hint}")
      elif m.group("name") not in NOT_BUILT:
        _, error = build_config(root, path, arg)
        if error:
          failures.append(f"{name}:{unit.line}: {_config_label(path, arg)} does not build: {error}")
  return failures


# ------------------------------------------------------------------------------------------
# 3. Modules run with python -m.

_MODULE = re.compile(r"\bpython3?\s+(?:-\w+\s+)*-m\s+(beit_jax(?:\.[A-Za-z_]\w*)*)")


def module_problem(root: pathlib.Path, module: str) -> str | None:
  """Why `python -m module` would not find it in the file tree, or None."""
  parts = module.split(".")
  here = root
  for part in parts[:-1]:
    here = here / part
    if not (here / "__init__.py").is_file():
      return f"{_display(here, root)}/ is not a package"
  here = here / parts[-1]
  if (here.parent / f"{parts[-1]}.py").is_file():
    return None
  if (here / "__init__.py").is_file():
    if (here / "__main__.py").is_file():
      return None
    return f"{_display(here, root)}/ is a package without __main__.py"
  return f"no {_display(here, root)}.py nor {_display(here, root)}/"


def check_modules(md: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
  page, name, failures, reported = _read(md), _display(md, root), [], set()
  for unit in page.units:
    for m in _MODULE.finditer(unit.text):
      module = m.group(1)
      if module in reported or any(part.isupper() for part in module.split(".")):
        continue  # reported already, or a placeholder: python -m beit_jax.X
      reported.add(module)
      problem = module_problem(root, module)
      if problem:
        failures.append(f"{name}:{unit.line}: python -m {module}: {problem}")
  return failures


# ------------------------------------------------------------------------------------------
# 4. --config.a.b overrides.

_OVERRIDE = re.compile(r"--config\.(?P<field>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
# Types ml_collections' config_flags can parse from the command line (its _FIELD_TYPE_TO_PARSER).
_SETTABLE = (bool, int, float, str, tuple, object)


def _placeholder_field(field: str) -> bool:
  """--config.FIELD, --config.model.NAME, --config.a.b: how a page writes 'some field'."""
  parts = field.split(".")
  return any(part.isupper() for part in parts) or all(len(part) == 1 for part in parts)


def field_problem(config, field: str) -> str | None:
  """Why `--config.<field>=...` would not set a field of `config`, or None."""
  import ml_collections  # pylint: disable=g-import-not-at-top: only when a config is built

  holder, walked = config, []
  parts = field.split(".")
  for i, part in enumerate(parts):
    if not isinstance(holder, ml_collections.ConfigDict):
      return (
        f"{'.'.join(walked)} is a {type(holder).__name__} ({holder!r:.60}), "
        f"not a ConfigDict: it has no field {part!r}"
      )
    if part not in holder:
      close = difflib.get_close_matches(part, list(holder.keys()), n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      where = f"{'.'.join(walked)}" if walked else "the top level"
      return f"no field {part!r} in {where}{hint}"
    if i == len(parts) - 1:
      kind = holder.get_type(part)
      if kind is type(None):
        return (
          f"{field} is a plain None in the config: the command line cannot set it "
          f"(the config should use common.unset(type))"
        )
      if not (kind in _SETTABLE or issubclass(kind, ml_collections.ConfigDict)):
        return f"{field} is a {kind.__name__}: the command line cannot set it"
      return None
    holder = holder[part]
    walked.append(part)
    if holder is None:
      return (
        f"{'.'.join(walked)} is None in this config (a section this recipe does not "
        f"have), so {field} cannot be set"
      )
  return None


def _default_configs(root: pathlib.Path) -> dict:
  out = {}
  for path in sorted((root / "configs").glob("*.py")):
    if path.stem not in NOT_BUILT:
      config, _ = build_config(root, f"configs/{path.name}", None)
      if config is not None:
        out[f"configs/{path.name}"] = config
  return out


def _unit_config(unit: Unit) -> tuple[str | None, str | None, str | None]:
  """(config path, arg, why skipped) of the command a unit is: see the module docstring."""
  m = _CONFIG_FLAG.search(unit.text)
  if m:
    path, arg = m.group("path"), _clean_arg(m.group("arg"), unit.kind)
  elif unit.kind != "prose" and (m := _CONFIG_NAMED.search(unit.text)):
    path, arg = f"configs/{m.group('name')}.py", _clean_arg(m.group("arg"), unit.kind)
  else:
    return None, None, None
  if re.search(r"[$<{*]", path) or pathlib.PurePosixPath(path).stem.isupper():
    return path, arg, "a placeholder"
  if path == "configs/from_workdir.py":
    return path, arg, "the config of a past run"
  if not path.startswith(("configs/", "tests/")) or not path.endswith(".py"):
    return path, arg, "a config file outside the repository's configs/ and tests/"
  return path, arg, None


def check_overrides(md: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
  page, name, failures = _read(md), _display(md, root), []
  for unit in page.units:
    fields = [
      m.group("field")
      for m in _OVERRIDE.finditer(unit.text)
      if not _placeholder_field(m.group("field"))
    ]
    if not fields:
      continue
    path, arg, skipped = _unit_config(unit)
    if skipped:
      continue  # from_workdir.py's config.json, the user's own config file, a placeholder
    if path is None:
      # No config in this command (prose, or flags listed alone): the field must exist in
      # at least one of configs/*.py built with its default arg.
      configs = _default_configs(root)
      if not configs:
        failures.append(
          f"{name}:{unit.line}: no config of configs/ builds here, so "
          f"--config.{fields[0]} cannot be checked (is the venv active?)"
        )
        continue
      for field in fields:
        problems = {label: field_problem(config, field) for label, config in configs.items()}
        if all(problems.values()):
          first = min(problems, key=lambda k: len(problems[k]))
          failures.append(
            f"{name}:{unit.line}: --config.{field} (no config in this command):"
            f" no config of configs/ has it; e.g. {first}: {problems[first]}"
          )
      continue
    label = _config_label(path, arg)
    if not (root / path).is_file():
      failures.append(f"{name}:{unit.line}: --config={label}: {path} does not exist")
      continue
    config, error = build_config(root, path, arg)
    if error:
      failures.append(f"{name}:{unit.line}: --config={label} does not build: {error}")
      continue
    for field in fields:
      problem = field_problem(config, field)
      if problem:
        failures.append(f"{name}:{unit.line}: --config.{field} with --config={label}: {problem}")
  return failures


CHECKS = {
  "links": check_links,
  "configs": check_configs,
  "modules": check_modules,
  "overrides": check_overrides,
}


def check_all(md: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
  return [failure for check in CHECKS.values() for failure in check(md, root)]


if __name__ == "__main__":
  files = [pathlib.Path(a).resolve() for a in sys.argv[1:]] or markdown_files()
  all_failures = [f for md in files for f in check_all(md)]
  print("\n".join(all_failures) or f"{len(files)} files: no problems")
  sys.exit(1 if all_failures else 0)
