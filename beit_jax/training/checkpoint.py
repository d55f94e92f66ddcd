"""Orbax checkpoints of a run: periodic async saves, keep-N, resume (the train state).

On disk: `<workdir>/checkpoints/<step>/{state,meta}`. Orbax writes a step into a
temporary directory and renames it when complete, so a save cut short by a crash is
never listed as a checkpoint. Works the same for local paths and gs://.
"""

import json
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from beit_jax.params import blocks
from beit_jax.training import validate
from beit_jax.errors import ConfigError

# Reading a checkpoint's params (into a model or to inspect them) is `beit_jax.params`'
# business: `params.load_into`, `params.read`.

RULES = (
  ("checkpoint.every_steps", *validate.POSITIVE_INT),
  ("checkpoint.keep", *validate.POSITIVE_INT),
)


def check_writable(workdir: str, field: str = "workdir") -> None:
  """Fails fast (before any compute) when the workdir cannot be written."""
  probe = epath.Path(workdir) / f".write_probe_{uuid.uuid4().hex[:8]}"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    detail = " ".join(str(e).split())  # one line: GCS errors put the reason on a second one
    raise ConfigError(f"{field}={workdir} is not writable: {type(e).__name__}: {detail}") from None


def make_manager(
  workdir: str, *, every_steps: int, keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
  if every_steps <= 0:
    raise ConfigError(f"checkpoint.every_steps must be > 0, got {every_steps}")
  if keep < 1:
    raise ConfigError(f"checkpoint.keep must be >= 1, got {keep}")
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=every_steps,
    max_to_keep=keep,
    enable_async_checkpointing=async_save,
    create=True,
  )
  return ocp.CheckpointManager(
    epath.Path(workdir) / "checkpoints", options=options, item_names=("state", "meta")
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  meta: dict | None = None,
  *,
  force: bool = False,
) -> bool:
  """Saves `state` (a pytree of arrays) and JSON `meta` if this step is due."""
  return manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}, step=int(step)))
    ),
    force=force,
  )


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
  """(state, meta) of the newest readable checkpoint, laid out like `abstract_state`.

  A checkpoint that cannot be read (e.g. files truncated by a full disk) is
  reported, moved aside to `<step>.unreadable` (`.unreadable.2`, ... if that is taken;
  kept for inspection, no longer listed) and the next older one is tried. None when
  there is nothing to resume.
  """
  want = blocks.layout(abstract_state)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      # A run may resume in the other block layout (model.scan_layers changed): read the
      # checkpoint in its own and convert.
      saved_tree = _saved_tree(manager, step) if want else None
      saved = blocks.layout(saved_tree)
      target = blocks.to_layout(abstract_state, saved)
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
      )
      state = restored.state
      if target is not abstract_state:
        logging.info(
          "Checkpoint %d is %s; converted to the run's %s blocks.", step, saved or "unscanned", want
        )
        state = jax.tree.map(
          lambda x, a: jax.device_put(x, a.sharding), blocks.to_layout(state, want), abstract_state
        )
      return state, dict(restored.meta)
    except Exception as e:  # pylint: disable=broad-except
      path = epath.Path(manager.directory) / str(step)
      aside = _unused_name(path.parent, f"{step}.unreadable")
      logging.error(
        "Checkpoint %s is unreadable (%s: %s); moving it to %s and trying the previous one.",
        path,
        type(e).__name__,
        str(e).splitlines()[0][:300] if str(e) else "",
        aside,
      )
      if jax.process_index() == 0:
        path.rename(aside)
      manager.reload()
  return None


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> Any:
  """A checkpoint's state metadata (shapes; None: unreadable, restored as the run's)."""
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.metadata(epath.Path(manager.directory) / str(step) / "state").item_metadata.tree
  except Exception:  # pylint: disable=broad-except
    return None  # a real mismatch fails in the restore, named


def _unused_name(folder: epath.Path, name: str) -> epath.Path:
  """`folder/name`, or `folder/name.2`, `.3`, ... if taken (a step unreadable again, after
  the run saved that step anew)."""
  path, n = folder / name, 1
  while path.exists():
    n += 1
    path = folder / f"{name}.{n}"
  return path


def save_params(path: str, params: Any, config: dict | None = None) -> str:
  """Writes params alone as a beit-jax checkpoint (`<path>/checkpoints/0/state`).

  What converters produce: `params.read(path)` (and so `init_from` /
  `tokenizer.init_from`) reads it like any run's checkpoint. `config` (JSON-able,
  e.g. the model fields) goes to `<path>/config.json` for the record.
  """
  manager = make_manager(path, every_steps=1, keep=1, async_save=False)
  manager.save(
    0,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params}), meta=ocp.args.JsonSave({"step": 0})
    ),
    force=True,
  )
  manager.wait_until_finished()
  manager.close()
  if config is not None:
    (epath.Path(path) / "config.json").write_text(json.dumps(config, indent=2))
  return path
