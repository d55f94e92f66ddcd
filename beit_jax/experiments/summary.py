"""The pretrained-vs-random table: paired summary over seeds, markdown, plot.

Apart from the runs (`pretraining_helps`) so that it can be used and tested without that
module's command-line flags.
"""
import numpy as np
from etils import epath
from PIL import Image, ImageDraw


def mean_std(values: list[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(runs: dict[str, list[float]]) -> dict:
  """Per task: mean/std of pretrained and random top-1 and of their paired difference."""
  out = {}
  for task in ("finetune", "probe"):
    pre, rand = runs[f"{task}/pretrained"], runs[f"{task}/random"]
    diff = [p - r for p, r in zip(pre, rand)]
    out[task] = {"pretrained": mean_std(pre), "random": mean_std(rand),
                 "difference": mean_std(diff),
                 "wins": sum(d > 0 for d in diff), "seeds": len(diff)}
  return out


def markdown(summary: dict, meta: dict) -> str:
  pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"
  rows = ["| validation top-1 (%) | BEiT-pretrained | random init | difference | "
          "pretrained better |", "|---|---|---|---|---|"]
  names = {"finetune": "fine-tuning", "probe": "linear probe (best block)"}
  for task, s in summary.items():
    rows.append(f"| {names[task]} | {pct(s['pretrained'])} | {pct(s['random'])} | "
                f"{'+' if s['difference'][0] >= 0 else ''}{pct(s['difference'])} | "
                f"{s['wins']} of {s['seeds']} seeds |")
  rows.append("")
  rows.append(f"Mean ± std over seeds {list(range(meta['seeds']))} on `embedded:"
              f"{meta['dataset']}` ({meta['num_train']} labelled training images, split "
              f"'{meta['labels']}'; {meta['num_eval']} validation images); MIM accuracy at "
              f"the end of pretraining {pct(meta['mim_accuracy'])} (majority-token baseline "
              f"{pct(meta['majority_baseline'])}). {meta['minutes']:.1f} min.")
  return "\n".join(rows) + "\n"


def plot(path: epath.Path, summary: dict, runs: dict[str, list[float]]) -> None:
  """Bars (mean) with std whiskers and one dot per seed, drawn with PIL."""
  w, h, left, bottom, top = 520, 320, 50, 40, 30
  image = Image.new("RGB", (w, h), "white")
  draw = ImageDraw.Draw(image)
  y = lambda v: h - bottom - v * (h - bottom - top)  # accuracy 0..1 -> pixel row
  for tick in np.linspace(0, 1, 6):
    draw.line([(left, y(tick)), (w - 10, y(tick))], fill=(225, 225, 225))
    draw.text((8, y(tick) - 6), f"{100 * tick:.0f}%", fill="black")
  colours = {"pretrained": (31, 119, 180), "random": (190, 190, 190)}
  group_w = (w - left - 20) / 2
  for g, task in enumerate(("finetune", "probe")):
    x0 = left + 10 + g * group_w
    draw.text((x0 + 20, h - bottom + 12), {"finetune": "fine-tuning",
                                          "probe": "linear probe"}[task], fill="black")
    for k, init in enumerate(("pretrained", "random")):
      mean, std = summary[task][init]
      bx = x0 + 20 + k * 90
      draw.rectangle([bx, y(mean), bx + 70, y(0)], fill=colours[init])
      draw.line([(bx + 35, y(mean - std)), (bx + 35, y(mean + std))], fill="black", width=2)
      for v in runs[f"{task}/{init}"]:
        draw.ellipse([bx + 31, y(v) - 4, bx + 39, y(v) + 4], outline="black")
  draw.rectangle([left + 10, 8, left + 20, 18], fill=colours["pretrained"])
  draw.text((left + 25, 7), "BEiT-pretrained", fill="black")
  draw.rectangle([left + 150, 8, left + 160, 18], fill=colours["random"])
  draw.text((left + 165, 7), "random init (validation top-1, dots: seeds)", fill="black")
  image.save(str(path))
