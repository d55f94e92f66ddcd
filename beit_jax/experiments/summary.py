"""The experiment's table: each initialisation's top-1, paired over seeds; markdown, plot.

Apart from the runs (`pretraining_helps`) so that it can be used and tested without that
module's command-line flags. Runs are keyed `<task>/<init>`: task 'finetune', 'probe' or
'segment' (validation mIoU; optional), init 'random' or a pretraining method ('v1', 'v2').
"""

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

TASKS = {
  "finetune": "fine-tuning",
  "probe": "linear probe (best block)",
  "segment": "segmentation mIoU",
}
NAMES = {
  "random": "random init",
  "v1": "BEiT v1 (dVAE tokens)",
  "v2": "BEiT v2 (VQ-KD tokens)",
  "random_masking": "v1, random masking",
  "pixels": "v1, pixel regression",
}
# The orderings the table checks: (better, worse) as the papers have it.
COMPARISONS = (("v2", "v1"), ("v1", "random_masking"), ("v1", "pixels"))
COLOURS = {
  "random": (190, 190, 190),
  "v1": (31, 119, 180),
  "v2": (214, 39, 40),
  "random_masking": (255, 127, 14),
  "pixels": (44, 160, 44),
}


def mean_std(values: list[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired(better: list[float], worse: list[float]) -> dict:
  """Mean/std of the per-seed difference, and on how many seeds it is positive."""
  diff = [a - b for a, b in zip(better, worse)]
  return {"difference": mean_std(diff), "wins": sum(d > 0 for d in diff), "seeds": len(diff)}


def summarise(runs: dict[str, list[float]], methods: tuple[str, ...]) -> dict:
  """Per task that ran: each init's mean/std; each method paired against random init, and
  the `COMPARISONS` whose two methods ran (key '<a>_vs_<b>')."""
  out = {}
  for task in (t for t in TASKS if f"{t}/random" in runs):
    rand = runs[f"{task}/random"]
    s = {"random": {"top1": mean_std(rand), "per_seed": rand}}
    for m in methods:
      s[m] = {
        "top1": mean_std(runs[f"{task}/{m}"]),
        "per_seed": runs[f"{task}/{m}"],
        **paired(runs[f"{task}/{m}"], rand),
      }
    for a, b in COMPARISONS:
      if {a, b} <= set(methods):
        s[f"{a}_vs_{b}"] = paired(runs[f"{task}/{a}"], runs[f"{task}/{b}"])
    out[task] = s
  return out


def _pct(ms: tuple[float, float]) -> str:
  return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _diff(p: dict) -> str:
  sign = "+" if p["difference"][0] >= 0 else ""
  return f"{sign}{_pct(p['difference'])} ({p['wins']} of {p['seeds']})"


def markdown(summary: dict, meta: dict) -> str:
  """One row per initialisation (a second table for segmentation), the paired comparisons,
  the per-seed scores; `meta['mim']` = {method: {mim_accuracy, majority_baseline}},
  `meta['segmentation_steps']` if segmentation ran."""
  methods = [m for m in NAMES if m != "random" and m in summary["finetune"]]
  rows = [
    "| validation top-1 (%) | fine-tuning | vs random | linear probe (best block) | "
    "vs random | MIM accuracy (majority) |",
    "|---|---|---|---|---|---|",
  ]
  ft, pr = summary["finetune"], summary["probe"]
  rows.append(
    f"| {NAMES['random']} | {_pct(ft['random']['top1'])} | | {_pct(pr['random']['top1'])} | | |"
  )
  for m in methods:
    mim = meta["mim"][m]
    acc = (
      "—"
      if np.isnan(mim["mim_accuracy"][0])
      else f"{_pct(mim['mim_accuracy'])} ({_pct(mim['majority_baseline'])})"
    )
    rows.append(
      f"| {NAMES[m]} | {_pct(ft[m]['top1'])} | {_diff(ft[m])} | "
      f"{_pct(pr[m]['top1'])} | {_diff(pr[m])} | {acc} |"
    )
  rows.append("")
  seg = summary.get("segment")
  if seg:
    rows += [
      "| validation mIoU (%) | segmentation | vs random |",
      "|---|---|---|",
      f"| {NAMES['random']} | {_pct(seg['random']['top1'])} | |",
    ]
    rows += [f"| {NAMES[m]} | {_pct(seg[m]['top1'])} | {_diff(seg[m])} |" for m in methods]
    rows.append("")
  for a, b in COMPARISONS:
    if f"{a}_vs_{b}" in ft:
      rows.append(
        f"{NAMES[a]} - {NAMES[b]}, paired (seeds where the first is better): "
        f"fine-tuning {_diff(ft[f'{a}_vs_{b}'])}, linear probe "
        f"{_diff(pr[f'{a}_vs_{b}'])}"
        + (f", segmentation {_diff(seg[f'{a}_vs_{b}'])}." if seg else ".")
      )
      rows.append("")
  for task, s in summary.items():
    rows.append(
      f"Per seed, {TASKS[task]}: "
      + "; ".join(
        f"{NAMES[i]} {', '.join(f'{100 * v:.1f}' for v in s[i]['per_seed'])}"
        for i in ["random"] + methods
      )
      + "."
    )
  rows.append("")
  rows.append(
    f"Mean ± std over seeds {list(range(meta['seeds']))} on `embedded:"
    f"{meta['dataset']}` ({meta['num_train']} labelled training images, split "
    f"'{meta['labels']}'; {meta['num_eval']} validation images); 'vs random': the "
    "paired difference (seeds where pretraining is better)."
    + (
      " Segmentation: validation mIoU on the pixel labels of `embedded:digits`' "
      f"segmentation set (11 classes), {meta['segmentation_steps']} steps per run."
      if seg
      else ""
    )
    + f" {meta['minutes']:.1f} min."
  )
  return "\n".join(rows) + "\n"


def plot(path: epath.Path, summary: dict, runs: dict[str, list[float]]) -> None:
  """Bars (mean) with std whiskers and one dot per seed, drawn with PIL."""
  inits = ["random"] + [m for m in NAMES if m != "random" and m in summary["finetune"]]
  w, h, left, bottom, top, bar = 120 + 100 * len(summary) * len(inits), 320, 50, 40, 30, 60
  image = Image.new("RGB", (w, h), "white")
  draw = ImageDraw.Draw(image)
  y = lambda v: h - bottom - v * (h - bottom - top)  # accuracy or mIoU 0..1 -> pixel row
  for tick in np.linspace(0, 1, 6):
    draw.line([(left, y(tick)), (w - 10, y(tick))], fill=(225, 225, 225))
    draw.text((8, y(tick) - 6), f"{100 * tick:.0f}%", fill="black")
  group_w = (w - left - 20) / len(summary)
  for g, task in enumerate(summary):
    x0 = left + 10 + g * group_w
    draw.text((x0 + 20, h - bottom + 12), TASKS[task], fill="black")
    for k, init in enumerate(inits):
      mean, std = summary[task][init]["top1"]
      bx = x0 + 20 + k * (bar + 15)
      draw.rectangle([bx, y(mean), bx + bar, y(0)], fill=COLOURS[init])
      draw.line(
        [(bx + bar // 2, y(mean - std)), (bx + bar // 2, y(mean + std))], fill="black", width=2
      )
      for v in runs[f"{task}/{init}"]:
        draw.ellipse([bx + bar // 2 - 4, y(v) - 4, bx + bar // 2 + 4, y(v) + 4], outline="black")
  for k, init in enumerate(inits):
    draw.rectangle([left + 10 + 170 * k, 8, left + 20 + 170 * k, 18], fill=COLOURS[init])
    draw.text((left + 25 + 170 * k, 7), NAMES[init], fill="black")
  image.save(str(path))
