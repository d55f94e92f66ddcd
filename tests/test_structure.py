"""The code's structure, read from its imports (ast): no cycles, trainers stay apart,
TensorFlow only in the input pipelines and loaded at first use, every import is pinned and
every pin imported."""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "beit_jax"
# Pinned though never imported: what the imported packages need at run time.
# libtpu (requirements-tpu.txt): jax loads it as its TPU plugin; `beit_jax.plan` only asks
# whether it is installed (importlib.util.find_spec), it never imports it by name.
# pytest-xdist (and its execnet): the pytest plugin that runs the tests on both cores.
# jax-cuda12-plugin and -pjrt (requirements-gpu.txt): jax loads them as its CUDA plugin.
RUNTIME_ONLY = {
  "jaxlib",
  "libtpu",
  "jax-cuda12-plugin",
  "jax-cuda12-pjrt",
  "pytest-xdist",
  "execnet",
  "ruff",
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}


def _imported(tree: ast.AST, importer: str, is_package: bool, known: set[str]) -> set[str]:
  """The modules of `known` that `tree` imports, anywhere in it (lazy imports count)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the importer's package
        anchor = importer.split(".")
        anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
      # `from a import b` imports module a.b if there is one, else a name of a.
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in known:  # `import a.b.c` of a module a.b: a.b
        name = name.rpartition(".")[0]
      if name and name != importer:
        found.add(name)
  return found


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  known = set(modules)
  return {
    name: _imported(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
    for name, path in modules.items()
  }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def trainer_violations(graph: dict[str, set[str]]) -> list[str]:
  """Imports of a trainer module from outside trainers/, and trainers importing trainers."""
  prefix = f"{PACKAGE}.trainers."
  bad = []
  for importer, targets in graph.items():
    for target in targets:
      if target.startswith(prefix):
        inside = importer.startswith(prefix)
        bad.append(
          f"{importer} imports the trainer {target}"
          if not inside
          else f"trainer {importer} imports trainer {target}"
        )
  return sorted(bad)


def test_the_checker_sees_cycles_and_trainer_imports():
  graph = {
    "beit_jax.a": {"beit_jax.b"},
    "beit_jax.b": {"beit_jax.c"},
    "beit_jax.c": {"beit_jax.a"},
    "beit_jax.d": set(),
  }
  assert find_cycle(graph) == ["beit_jax.a", "beit_jax.b", "beit_jax.c", "beit_jax.a"]
  assert find_cycle({"beit_jax.a": {"beit_jax.b"}, "beit_jax.b": set()}) is None
  graph = {
    "beit_jax.training.visuals": {"beit_jax.trainers.mim"},
    "beit_jax.trainers.mim": {"beit_jax.trainers.dvae"},
    "beit_jax.trainers": set(),
    "beit_jax.main": {"beit_jax.trainers"},
  }
  assert trainer_violations(graph) == [
    "beit_jax.training.visuals imports the trainer beit_jax.trainers.mim",
    "trainer beit_jax.trainers.mim imports trainer beit_jax.trainers.dvae",
  ]
  tree = ast.parse(
    "from beit_jax.data import ops\nimport beit_jax.models.vit\n"
    "def f():\n  from beit_jax import trainers\n"
  )
  known = {
    "beit_jax",
    "beit_jax.data",
    "beit_jax.data.ops",
    "beit_jax.models",
    "beit_jax.models.vit",
    "beit_jax.trainers",
  }
  assert _imported(tree, "beit_jax.x", False, known) == {
    "beit_jax.data.ops",
    "beit_jax.models.vit",
    "beit_jax.trainers",
  }


def test_no_import_cycles():
  cycle = find_cycle(import_graph(package_modules()))
  assert cycle is None, " -> ".join(cycle)


def test_trainers_are_imported_only_by_the_dispatch():
  modules = package_modules()
  assert f"{PACKAGE}.trainers.mim" in modules  # the check looks at the real tree
  assert trainer_violations(import_graph(modules)) == []


# The models (beit_jax/models/) raise plain ValueErrors about their attributes and arrays,
# for direct users of the API; the config's rules and ConfigErrors, which name fields,
# belong to the code that reads the config (e.g. training/model_rules.py, run once at start).
_CONFIG_ONLY = (f"{PACKAGE}.errors", f"{PACKAGE}.training.validate")


def model_config_violations(graph: dict[str, set[str]]) -> list[str]:
  return sorted(
    f"{importer} imports {target}"
    for importer, targets in graph.items()
    if importer.startswith(f"{PACKAGE}.models.")
    for target in targets
    if target in _CONFIG_ONLY
  )


def test_models_raise_no_config_errors():
  assert model_config_violations(
    {
      "beit_jax.models.vit": {"beit_jax.errors"},
      "beit_jax.training.model_rules": {"beit_jax.errors"},
    }
  ) == ["beit_jax.models.vit imports beit_jax.errors"]
  modules = package_modules()
  assert f"{PACKAGE}.models.vit" in modules  # the check looks at the real tree
  assert model_config_violations(import_graph(modules)) == []


# TensorFlow belongs to the input pipelines: only beit_jax/data/ (masking.py included: its
# tf.data mask ops) imports it, and loads it at its first use (`with epy.lazy_imports():`),
# so that models, trainers, the benchmark and the plan tool import without it
# (tests/test_tf_free.py runs them where `import tensorflow` fails).
TF_PACKAGES = ("tensorflow", "tensorflow_datasets")


def _tf_allowed(module: str) -> bool:
  return module.startswith(f"{PACKAGE}.data.")


def tf_import_violations(trees: dict[str, ast.AST]) -> list[str]:
  """Imports of TensorFlow outside the input pipelines, or inside them but not lazy."""
  bad = []
  for name, tree in trees.items():
    lazy = {
      id(node)
      for with_ in ast.walk(tree)
      if isinstance(with_, ast.With)
      and any(
        isinstance(i.context_expr, ast.Call)
        and isinstance(i.context_expr.func, ast.Attribute)
        and i.context_expr.func.attr == "lazy_imports"
        for i in with_.items
      )
      for node in ast.walk(with_)
    }
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        targets = [node.module or ""]
      else:
        continue
      for target in targets:
        if target.split(".")[0] not in TF_PACKAGES:
          continue
        if not _tf_allowed(name):
          bad.append(f"{name} imports {target}: only the input pipelines may")
        elif id(node) not in lazy:
          bad.append(f"{name} imports {target} at import time, not in epy.lazy_imports()")
  return sorted(bad)


def test_the_checker_sees_tensorflow_imports():
  lazy = "from etils import epy\nwith epy.lazy_imports():\n  import tensorflow as tf\n"
  trees = {
    "beit_jax.data.ops": ast.parse(lazy),
    "beit_jax.data.masking": ast.parse("import tensorflow as tf\n"),
    "beit_jax.training.runner": ast.parse("def f():\n  from tensorflow_datasets import core\n"),
    "beit_jax.models.vit": ast.parse(lazy),
  }
  assert tf_import_violations(trees) == [
    "beit_jax.data.masking imports tensorflow at import time, not in epy.lazy_imports()",
    "beit_jax.models.vit imports tensorflow: only the input pipelines may",
    "beit_jax.training.runner imports tensorflow_datasets: only the input pipelines may",
  ]


def test_tensorflow_is_loaded_by_the_input_pipelines_only_at_first_use():
  modules = package_modules()
  assert f"{PACKAGE}.data.pretrain" in modules  # the check looks at the real tree
  trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
  assert tf_import_violations(trees) == []


# --------------------------------------------------------------------------- loading weights

# Who may touch checkpoints on disk with orbax: `params.read` (a checkpoint's params, for a
# model), `training.checkpoint` (saving, and resuming a run's train state),
# `evaluation.classification` (its best/ record, written through `checkpoint`'s manager).
ORBAX_ALLOWED = {
  f"{PACKAGE}.params.read",
  f"{PACKAGE}.training.checkpoint",
  f"{PACKAGE}.evaluation.classification",
}
# params/'s loaders, which other modules call as `params.<name>` (never imported under
# another name: that is how a second way to load weights would start).
_LOADERS = ("read", "cast", "load_into")


def weight_loading_violations(trees: dict[str, ast.AST]) -> list[str]:
  """Modules outside params/ that load checkpoints: they import orbax (see ORBAX_ALLOWED),
  or import params/'s loaders (`read`, `cast`, `load_into`, or their modules) by name instead
  of `beit_jax.params`."""
  bad = []
  loaders = {f"{PACKAGE}.params.{n}" for n in _LOADERS}
  for name, tree in trees.items():
    if name == f"{PACKAGE}.params" or name.startswith(f"{PACKAGE}.params."):
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        targets = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for target in targets:
        if target.split(".")[0] == "orbax" and name not in ORBAX_ALLOWED:
          bad.append(f"{name} imports {target}: only {sorted(ORBAX_ALLOWED)} may")
        elif target in loaders:
          bad.append(f"{name} imports {target}: use beit_jax.params")
  return sorted(set(bad))


def test_the_checker_sees_weight_loading():
  trees = {
    "beit_jax.params.read": ast.parse("import orbax.checkpoint as ocp\n"),
    "beit_jax.visualize": ast.parse("import orbax.checkpoint as ocp\n"),
    "beit_jax.training.checkpoint": ast.parse(
      "from beit_jax.params.read import read as load_params\n"
    ),
    "beit_jax.trainers.mim": ast.parse("from beit_jax.params import load_into\n"),
    "beit_jax.api": ast.parse("from beit_jax.params import read\n"),
    "beit_jax.training.runner": ast.parse("from beit_jax import params\nparams.load_into(t, p)\n"),
  }
  assert weight_loading_violations(trees) == [
    "beit_jax.api imports beit_jax.params.read: use beit_jax.params",
    "beit_jax.trainers.mim imports beit_jax.params.load_into: use beit_jax.params",
    "beit_jax.training.checkpoint imports beit_jax.params.read: use beit_jax.params",
    f"beit_jax.visualize imports orbax.checkpoint: only {sorted(ORBAX_ALLOWED)} may",
  ]


def test_only_params_loads_checkpoints():
  modules = package_modules()
  assert f"{PACKAGE}.params.read" in modules  # the check looks at the real tree
  trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
  assert weight_loading_violations(trees) == []


# --------------------------------------------------------------------------- requirements


def _top_level_imports() -> set[str]:
  """Top-level names of the third-party packages the code and tests import."""
  names = set()
  for folder in (PACKAGE, "configs", "tests", "launch"):
    for path in (ROOT / folder).rglob("*.py"):
      text = path.read_text()
      for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
          names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
          names.add(node.module.split(".")[0])
      names.update(re.findall(r"importorskip\(\"(\w+)", text))
  local = {PACKAGE, "configs", "tests"}
  return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def _pins() -> dict[str, str]:
  """Distribution name (normalised) -> the requirements file or README line that pins it."""
  pins = {}
  norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
  for path in sorted(ROOT.glob("requirements*.txt")):
    for line in path.read_text().splitlines():
      line = line.split("#")[0].strip()
      if line and not line.startswith("-"):
        name, sep, _ = re.split(r"(==)", line, maxsplit=1)
        assert sep, f"{path.name}: {line!r} is not pinned with =="
        pins[norm(name.split("[")[0])] = path.name  # jax[cuda12] pins jax
  # Installed by the README's test line (with --no-deps), not by a requirements file.
  for name in re.findall(r"pip install --no-deps ([\w.-]+)==", (ROOT / "README.md").read_text()):
    pins[norm(name)] = "README.md"
  return pins


def test_every_import_is_pinned_and_every_pin_imported():
  norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
  pins = _pins()
  dists = importlib.metadata.packages_distributions()
  imported = set()
  unknown = []
  for name in sorted(_top_level_imports()):
    if name not in dists:
      unknown.append(name)  # not installed here: its test skips; still must be pinned
      continue
    imported.update(norm(d) for d in dists[name])
  unpinned = sorted(d for d in imported if d not in pins)
  assert not unpinned, f"imported but not pinned: {unpinned}"
  unused = sorted(set(pins) - imported - RUNTIME_ONLY - {norm(n) for n in unknown})
  assert not unused, f"pinned but never imported: {unused}"
  missing = [n for n in unknown if norm(n) not in pins]
  if missing:
    pytest.fail(f"imported but neither installed nor pinned: {missing}")


def _ruff(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args, "--no-cache"],
    cwd=cwd,
    capture_output=True,
    text=True,
    check=False,
  )


def test_the_linter_sees_an_unused_import(tmp_path):
  (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
  (tmp_path / "bad.py").write_text("import os\n")
  run = _ruff("check", "--output-format=concise", ".", cwd=tmp_path)
  assert run.returncode == 1 and "bad.py:1:8: F401" in run.stdout, run.stdout + run.stderr


def test_ruff_finds_nothing():
  """The lint rules of pyproject.toml [tool.ruff] over the package, configs and tests."""
  run = _ruff("check", "--output-format=concise", ".", cwd=ROOT)
  assert run.returncode == 0, run.stdout + run.stderr


def test_the_formatter_sees_single_quotes(tmp_path):
  (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
  (tmp_path / "bad.py").write_text("x = 'a'\n")
  run = _ruff("format", "--check", ".", cwd=tmp_path)
  assert run.returncode == 1 and "bad.py" in run.stdout + run.stderr, run.stdout + run.stderr


def test_the_code_is_formatted():
  """`ruff format` (pyproject.toml [tool.ruff.format]) leaves every file as it is."""
  run = _ruff("format", "--check", ".", cwd=ROOT)
  assert run.returncode == 0, run.stdout + run.stderr


# The layout (docs/architecture.md#modules): the package's top holds the entry points and
# what every part shares; everything else lives in a subpackage with one purpose.
TOP_LEVEL_MODULES = {"api", "benchmark", "errors", "logs", "main", "plan", "visualize"}
SUBPACKAGES = {
  "convert",
  "data",
  "evaluation",
  "experiments",
  "models",
  "params",
  "tokenizers",
  "trainers",
  "training",
}


def _layout(root: pathlib.Path) -> tuple[set[str], set[str]]:
  modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
  packages = {p.parent.name for p in root.glob("*/__init__.py")}
  return modules, packages


def test_the_layout_checker_sees_a_new_top_level_module(tmp_path):
  (tmp_path / "__init__.py").write_text("")
  (tmp_path / "helpers.py").write_text("")
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "__init__.py").write_text("")
  assert _layout(tmp_path) == ({"helpers"}, {"data"})


def test_the_top_level_holds_the_entry_points_and_the_subpackages():
  """A new module goes into the subpackage of its concern; a new top-level module or
  subpackage is a change of the layout: add it here and to docs/architecture.md."""
  modules, packages = _layout(ROOT / PACKAGE)
  assert modules == TOP_LEVEL_MODULES, f"top-level modules: {sorted(modules)}"
  assert packages == SUBPACKAGES, f"subpackages: {sorted(packages)}"
  for name in SUBPACKAGES:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert f"`{name}/`" in text, f"docs/architecture.md does not describe {name}/"
