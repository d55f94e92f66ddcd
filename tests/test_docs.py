"""README.md and docs/*.md agree with the repository: links and anchors resolve, the configs
they name exist and build, the `python -m beit_jax.X` modules exist, and every
`--config.a.b=` names a field of its command's config (tests/docs_check.py). Seconds: configs
are built (ml_collections only), nothing of JAX is imported or compiled.

The last tests feed the checks synthetic pages with one mistake each, to show each is caught.
"""

import textwrap

import ml_collections
import pytest

from tests import docs_check

ROOT = docs_check.ROOT
PAGES = docs_check.markdown_files(ROOT)


@pytest.mark.parametrize("check", sorted(docs_check.CHECKS))
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs(page, check):
  failures = docs_check.CHECKS[check](page, ROOT)
  assert not failures, f"{len(failures)} {check} problem(s):\n" + "\n".join(failures)


def test_pages_found():
  assert ROOT / "README.md" in PAGES
  assert any(p.parent == ROOT / "docs" for p in PAGES)


# ------------------------------------------------------------------------------------------
# The checks catch what they should (and nothing else) on synthetic pages.


def _page(tmp_path, text, name="page.md"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text), encoding="utf-8")
  return path


def _one(failures, *fragments):
  """The failures that hold every fragment: exactly one."""
  matches = [f for f in failures if all(fragment in f for fragment in fragments)]
  assert len(matches) == 1, (fragments, failures)
  return matches[0]


@pytest.mark.parametrize(
  "heading, anchor",
  [
    ("Results at a glance", "results-at-a-glance"),
    (
      "Does pretraining help, and does v2 beat v1? (measured)",
      "does-pretraining-help-and-does-v2-beat-v1-measured",
    ),
    (
      "4. Recipes (`configs/common.py`, `configs/beit_*.py`)",
      "4-recipes-configscommonpy-configsbeit_py",
    ),
    ("**Bold**, _emphasis_ and snake_case [a link](x.md)", "bold-emphasis-and-snake_case-a-link"),
    ("A — B", "a--b"),
  ],
)
def test_github_anchor(heading, anchor):
  assert docs_check.github_anchor(heading) == anchor


def test_links(tmp_path):
  _page(
    tmp_path,
    """\
      # Other page

      ## Real section
      ## Real section
      <a id="custom"></a>
      """,
    "other.md",
  )
  page = _page(
    tmp_path,
    """\
      # Title

      ## Local heading

      Fine: [other](other.md), [its section](other.md#real-section),
      [its second](other.md#real-section-1), [html](other.md#custom), [here](#local-heading),
      [web](https://example.com/nope.md), [mail](mailto:a@b.c), `[in code](missing.md)`,
      [folder](./), [a file](page.md "title").

      ```bash
      cat [in a block](missing_in_block.md)
      ```

      Broken: [gone](nope.md), [no anchor](other.md#real-sectoin),
      ![image](images/none.png) and [this page](#nowhere).

      [ref]: also_gone.md
      """,
  )
  failures = docs_check.check_links(page, tmp_path)
  _one(failures, "page.md:14:", "(nope.md)", "nope.md does not exist")
  _one(
    failures,
    "page.md:14:",
    "other.md#real-sectoin",
    "no heading with anchor",
    "did you mean #real-section?",
  )
  _one(failures, "page.md:15:", "images/none.png", "does not exist")
  _one(failures, "page.md:15:", "(#nowhere)", "page.md has no heading with anchor #nowhere")
  _one(failures, "page.md:17:", "also_gone.md does not exist")
  assert len(failures) == 5, failures


def test_configs(tmp_path):
  page = _page(
    tmp_path,
    """\
      Fine: `configs/beit_base.py`, configs/finetune_base.py, `configs/NAME.py:key=value`,
      `--config=configs/beit_base.py:variant=L/16,rel=True`, configs/from_workdir.py.

      ```bash
      python -m beit_jax.main --config=configs/nonexistent.py --workdir=/tmp/x
      ```

      Broken: `--config=configs/beit_base.py:variant=L/16,bogus=1`.
      """,
  )
  failures = docs_check.check_configs(page, ROOT)
  _one(failures, "page.md:5:", "configs/nonexistent.py does not exist")
  _one(failures, "page.md:8:", "configs/beit_base.py:variant=L/16,bogus=1 does not build", "bogus")
  assert len(failures) == 2, failures


def test_modules(tmp_path):
  page = _page(
    tmp_path,
    """\
      ```bash
      python -m beit_jax.main --config=configs/beit_tiny_local.py --workdir=/tmp/x
      python -m beit_jax.convert --help && python3 -m beit_jax.experiments.pretraining_helps
      python -m beit_jax.nonexistent --flag
      ```

      And in prose: `python -m beit_jax.models` and python -m beit_jax.trainers.nope;
      `python -m beit_jax.X` is a placeholder.
      """,
  )
  failures = docs_check.check_modules(page, ROOT)
  _one(failures, "page.md:4:", "python -m beit_jax.nonexistent", "no beit_jax/nonexistent.py")
  _one(failures, "page.md:7:", "python -m beit_jax.models", "without __main__.py")
  _one(failures, "page.md:7:", "python -m beit_jax.trainers.nope")
  assert len(failures) == 3, failures


def test_overrides(tmp_path):
  page = _page(
    tmp_path,
    """\
      ```bash
      python -m beit_jax.main --config=configs/finetune_base.py --workdir=/tmp/ft \\
          --config.optim.lr=1e-3 \\
          --config.optim.lrr=1
      launch/tpu_vm.sh run configs/beitv2_base.py --config.model.patch_aggregation.layer=3
      python -m beit_jax.main --config=configs/from_workdir.py:/tmp/x --config.anything=1
      python -m beit_jax.main --config=/my/own.py --config.anything=1
      python -m beit_jax.main --config=configs/beit_base.py --config.model.patch_aggregation.layer=3
      ```

      | Config | Flags |
      |---|---|
      | `configs/beit_large.py:tensor=2 --config.model.remat=True --config.model.scan_layer=1` | |

      In prose: `--config.restart_dead_codes=True`, --config.mesh.fsdp=8
      and the misspelt `--config.input.batchsize=8`; placeholders: `--config.a.b=`,
      `--config.model.FIELD=1`, `python -m beit_jax.main --config=configs/beit_base.py
      --config.x=1`.
      """,
  )
  failures = docs_check.check_overrides(page, ROOT)
  _one(
    failures,
    "page.md:2:",
    "--config.optim.lrr with --config=configs/finetune_base.py",
    "no field 'lrr' in optim",
    "did you mean lr",
  )
  _one(
    failures,
    "page.md:8:",
    "--config.model.patch_aggregation.layer",
    "configs/beit_base.py",
    "no field 'patch_aggregation'",
  )
  _one(
    failures,
    "page.md:13:",
    "--config.model.scan_layer with --config=configs/beit_large.py:tensor=2",
    "did you mean scan_layers",
  )
  _one(failures, "page.md:16:", "--config.input.batchsize (no config in this command)")
  assert len(failures) == 4, failures


def test_field_problem():
  config = ml_collections.ConfigDict(dict(a=dict(b=1, none=None), section=None, n=3))
  config.c = ml_collections.config_dict.placeholder(int)
  assert docs_check.field_problem(config, "a.b") is None
  assert docs_check.field_problem(config, "c") is None  # a placeholder: settable
  assert docs_check.field_problem(config, "a") is None  # a whole ConfigDict
  assert "plain None" in docs_check.field_problem(config, "a.none")
  assert "section is None" in docs_check.field_problem(config, "section.x")
  assert "not a ConfigDict" in docs_check.field_problem(config, "n.x")
  assert "no field 'x' in the top level" in docs_check.field_problem(config, "x")
