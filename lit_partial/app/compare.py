"""Side-by-side comparison of techniques: accuracy against cost, one row per run of a multirun.

After ``lit-partial-train -m partial=none,freeze_backbone,...`` Hydra calls :class:`ComparisonReport`
(``hydra.callbacks`` in ``conf/train.yaml``), which reads every job's ``costs.json`` (written by
:class:`lit_partial.callbacks.CostMonitor`) and writes ``comparison.md`` (a Markdown table) and
``comparison.png`` (accuracy against backward FLOPs, saved activation bytes and trainable parameters) into the
sweep folder. Runs of the LLM job (``experiment=lm``) show bits per byte on the fine-tuning and the pretraining
domain instead of accuracy, and the optimizer state as a fourth panel. On its own:
``lit-partial-compare <sweep folder>`` (:func:`main`).

Example:
    >>> rows = [{"name": "none", "val_acc": 0.98, "backward_flops": 2e6, "forward_flops": 1e6,
    ...          "trainable_params": 1000, "saved_activation_bytes": 4096, "optimizer_state_bytes": 8192,
    ...          "step_time_ms": 5.0}]
    >>> print(markdown_table(rows).splitlines()[2])
    | none | 0.980 | 2.00 | 1.00x | 1,000 | 4 | 8 | 5.0 | 1.00x |
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

__all__ = ["LM_COLUMNS", "ComparisonReport", "load_runs", "main", "markdown_table", "saved_bytes", "write_report"]

log = logging.getLogger("train")


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every ``costs.json`` under ``sweep_dir`` (one per job), in job order."""
    runs = []
    for path in sorted(sweep_dir.glob("*/costs.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        record = json.loads(path.read_text())
        record["job"] = path.parent.name
        runs.append(record)
    return runs


def _reference(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return next((r for r in rows if r["name"] == "none"), rows[0])


def _ratio(value: float, ref: float) -> str:
    if not ref or math.isnan(value) or math.isnan(ref):
        return "-"
    ratio = value / ref
    return f"{ratio:.2g}x" if 0 < ratio < 0.1 else f"{ratio:.2f}x"


#: The quality columns of a run of the LLM job (experiment=lm): ``(header, key)``; lower is better.
LM_COLUMNS = (("val loss", "val_loss"), ("val bpb", "val_bpb"), ("forget bpb", "forget_bpb"))


def saved_bytes(run: dict[str, Any]) -> float:
    """The activation bytes a run keeps for backward: the larger of its two counts (see ``CostMonitor``).

    ``saved_activation_bytes`` (autograd's saved-tensor hooks) misses what selective checkpointing caches;
    ``live_forward_bytes`` (storages the forward left alive) sees it, but not tensors made before the forward (the
    batch). Runs recorded before ``live_forward_bytes`` existed have only the first.
    """
    return max(float(run["saved_activation_bytes"]), float(run.get("live_forward_bytes", 0.0)))


def _is_lm(rows: list[dict[str, Any]]) -> bool:
    """Runs of the LLM job (they log bits per byte, not accuracy)."""
    return any("val_bpb" in r for r in rows)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table; ratios are relative to the ``none`` run (or the first one).

    Runs of the LLM job (``experiment=lm``, rows with ``val_bpb``) get the columns ``val loss``, ``val bpb``
    and ``forget bpb`` (bits per byte on the pretraining domain) in place of ``val acc``.
    """
    ref = _reference(rows)
    lm = _is_lm(rows)
    quality = " | ".join(h for h, _ in LM_COLUMNS) if lm else "val acc"
    header = (
        f"| technique (`partial=`) | {quality} | backward MFLOPs/step | backward vs none | trainable params "
        "| saved activations KiB | optimizer state KiB | ms/step | time vs none |"
    )
    lines = [header, "|---" * (9 + (len(LM_COLUMNS) - 1 if lm else 0)) + "|"]
    for r in rows:
        if lm:
            values = " | ".join(f"{r.get(k, math.nan):.3f}" for _, k in LM_COLUMNS)
        else:
            values = f"{r.get('val_acc', math.nan):.3f}"
        lines.append(
            f"| {r['name']} | {values} | {r['backward_flops'] / 1e6:.2f} "
            f"| {_ratio(r['backward_flops'], ref['backward_flops'])} | {r['trainable_params']:,.0f} "
            f"| {saved_bytes(r) / 1024:.0f} | {r['optimizer_state_bytes'] / 1024:.0f} "
            f"| {r['step_time_ms']:.1f} | {_ratio(r['step_time_ms'], ref['step_time_ms'])} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Quality against the deterministic costs (backward FLOPs, saved activations, trainable parameters, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = _is_lm(rows)
    panels = [
        ("backward_flops", "backward MFLOPs per step", 1e6, "linear"),
        ("saved_activation_bytes", "activations saved for backward (KiB)", 1024.0, "linear"),
        ("trainable_params", "trainable parameters (log scale)", 1.0, "log"),
    ]
    if lm:
        panels.append(("optimizer_state_bytes", "optimizer state (KiB, log scale)", 1024.0, "log"))
    ys = (("val_bpb", "prose bits per byte"), ("forget_bpb", "code bits per byte (forgetting)")) if lm else (
        ("val_acc", "validation accuracy"),
    )  # fmt: skip
    markers = "osD^vP*Xhp<>"
    fig, grid = plt.subplots(
        len(ys), len(panels), figsize=(4 * len(panels) + 3, 4.4 * len(ys) + 0.4), sharey="row", squeeze=False
    )
    for row_axes, (ykey, ylabel) in zip(grid, ys, strict=True):
        for ax, (key, label, scale, xscale) in zip(row_axes, panels, strict=True):
            for i, r in enumerate(rows):
                value = saved_bytes(r) if key == "saved_activation_bytes" else r[key]
                x = max(value / scale, 1e-3) if xscale == "log" else value / scale
                ax.scatter([x], [r.get(ykey, math.nan)], s=60, marker=markers[i % len(markers)], label=r["name"])
            ax.set_xscale(xscale)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        row_axes[0].set_ylabel(ylabel)
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(rows), 6), frameon=False)
    title = (
        "Fine-tuning a byte-level Llama pretrained on Python source on English prose: bits per byte (lower is better)"
        " against cost"
        if lm
        else "Fine-tuning digits 5-9 from a backbone pretrained on 0-4: accuracy against cost, per technique"
    )
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1 if len(ys) == 1 else 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(sweep_dir: str | Path) -> tuple[Path, Path] | None:
    """Write ``comparison.md`` and ``comparison.png`` into ``sweep_dir``; ``None`` when no job wrote costs."""
    sweep = Path(sweep_dir)
    rows = load_runs(sweep)
    if not rows:
        return None
    md, png = sweep / "comparison.md", sweep / "comparison.png"
    notes = (
        "\n\nPer training step, averaged over the run: FLOPs and saved activation bytes of the measured steps "
        "(one in `costs.every_n_steps`) "
        "(torch.utils.flop_counter; bytes saved for backward when backward starts: the larger of autograd's saved "
        "tensors and the storages the forward left alive, which include selective checkpointing's cache), "
        "trainable parameter elements "
        "(requires_grad, less masked elements), the largest optimizer state (after the measured steps and at the end), "
        "median wall time of the unmeasured steps "
        "(CPU, shared machine: noisy). SelectiveBackprop's scoring forward is in the time, not in the FLOPs.\n"
    )
    if _is_lm(rows):
        notes += (
            "\nLLM job: val = held-out English prose (the fine-tuning domain), forget = held-out Python source (the "
            "pretraining domain); bpb = bits per byte = mean token cross-entropy / ln 2 (a token is a byte).\n"
        )
    md.write_text(f"# Comparison ({sweep})\n\n{markdown_table(rows)}{notes}")
    _plot(rows, png)
    return md, png


class ComparisonReport(HydraCallback):
    """Hydra callback: after a multirun, write the comparison report into the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        written = write_report(Path(str(config.hydra.sweep.dir)))
        if written is not None:
            print(f"\ncomparison report: {written[0]} and {written[1]}")
            print(written[0].read_text())


def main(argv: list[str] | None = None) -> int:
    """``lit-partial-compare <sweep folder>``: write the report of a finished multirun and print its table."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: lit-partial-compare <sweep folder>  (the folder of a `lit-partial-train -m ...` run)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    result = write_report(args[0])
    if result is None:
        print(f"no */costs.json under {args[0]}: run `lit-partial-train -m partial=...` first", file=sys.stderr)
        return 1
    print(result[0].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
