"""The tables `gptlib bench` prints: training, evaluation and data reader, then the targets."""

from __future__ import annotations

SIDES = ("reference", "gptlib")
BUSY_CPU_USE = 0.8  # below this share of its threads' CPU time, a side competed for the cores


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _percent(value: float | None) -> str:
    return _fmt(None if value is None else 100 * value, ".0f", "%")


def _side_row(precision: str, side: str, row: dict) -> str:
    """The columns the training and evaluation tables share, for one side's row."""
    return (f"{precision:<15}{side:<11}{row['tokens_per_s']:>10,.0f}{row['median_s']:>9.2f}"
            f"{_percent(row['cpu_use']):>6}{_percent(row['mfu']):>8}{row['peak_rss_mb']:>13,.0f}")


def _header(result: dict) -> list[str]:
    shape, machine, settings = result["shape"], result["machine"], result["settings"]
    return [
        f"gptlib bench: {shape['n_layers']} layers, {shape['n_heads']} heads, emb {shape['emb_dim']}, "
        f"context {shape['context_length']}, vocab {shape['vocab_size']}, micro-batch "
        f"{shape['microbatch_size']}, dropout {shape['drop_rate']}",
        f"device: {machine['device_name']} ({machine['device']}, {machine['cpu_threads']} threads), "
        f"torch {machine['torch']}; load average {machine['loadavg_start']} -> {machine.get('loadavg_end')}",
        f"{settings['rounds']} round(s) x ({settings['warmup']} warm-up + {settings['steps']} timed steps) "
        f"per side, each round a fresh process; medians; compile={settings['compile']}; "
        f"{result['flops_per_token'] / 1e6:,.0f} MFLOP/token",
        "CPU = CPU time / (wall time x threads): well below 100% means the machine was busy.",
    ]


def _training_table(train: dict) -> list[str]:
    if not train:
        return []
    lines = ["", f"{'training step':<15}{'side':<11}{'tokens/s':>10}{'step s':>9}{'CPU':>6}{'MFU':>8}"
                 f"{'peak RSS MB':>13}{'first loss':>12}"]
    for precision, rows in train.items():
        for side in SIDES:
            if side in rows:
                row = rows[side]
                gpu = f"   GPU peak {row['peak_device_mb']:,.0f} MB" if row.get("peak_device_mb") else ""
                lines.append(_side_row(precision, side, row) + f"{row['losses'][0]:>12.4f}" + gpu)
        if "ratios" in rows:
            r = rows["ratios"]
            lines.append(f"{precision:<15}{'ratio':<11}{_fmt(r['tokens_per_s'], '.2f', 'x'):>10}{'':>23}"
                         f"{_fmt(r['peak_rss'], '.2f', 'x'):>13}")
    return lines


def _eval_table(evals: dict, batch_size: int, context: int) -> list[str]:
    if not evals:
        return []
    lines = ["", f"{'evaluation':<15}{'side':<11}{'tokens/s':>10}{'batch s':>9}{'CPU':>6}{'MFU':>8}"
                 f"{'peak RSS MB':>13}   batch {batch_size} x {context}"]
    for precision, rows in evals.items():
        lines += [_side_row(precision, side, rows[side]) for side in SIDES if side in rows]
        if "ratios" in rows:
            ratio = _fmt(rows["ratios"]["tokens_per_s"], ".2f", "x")
            lines.append(f"{precision:<15}{'ratio':<11}{ratio:>10}")
    return lines


def _data_table(data: dict | None) -> list[str]:
    if not data:
        return []
    small, large = (str(n) for n in (min(data["tokens"]), max(data["tokens"])))
    small_m, large_m = (f"{int(n) / 1e6:g}M" for n in (small, large))
    lines = ["", f"{'data reader':<15}{'RSS growth MB:':>16}{small_m:>8}{large_m:>9}{'difference':>12}"
                 f"   {large_m}: anon + file-backed"]
    for loader in ("gptlib", "series"):
        runs = data[loader]["runs"]
        split = " + ".join(_fmt(runs[large][key], ",.0f") for key in ("anon_growth_mb", "file_growth_mb"))
        lines.append(f"{loader:<15}{'':>16}{runs[small]['growth_mb']:>8,.0f}{runs[large]['growth_mb']:>9,.0f}"
                     f"{data[loader]['growth_mb']:>12,.0f}   {split}")
    return lines


def _busy_warning(result: dict) -> list[str]:
    busy = [f"{kind} {precision} {side}" for kind in ("train", "eval")
            for precision, rows in result[kind].items() for side in SIDES
            if side in rows and (rows[side].get("cpu_use") or 1.0) < BUSY_CPU_USE]
    if not busy or result["machine"]["device"] != "cpu":
        return []
    return ["", f"WARNING: the machine was busy during {', '.join(busy)} (CPU < "
                f"{100 * BUSY_CPU_USE:.0f}%): timings and ratios are unreliable; rerun when idle."]


def _targets(found: list[dict]) -> list[str]:
    if not found:
        return []
    lines = ["", "targets:"]
    for t in found:
        mark = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        lines.append(f"  {t['name']:<52} {_fmt(t['value'], '.2f'):>8} {t['op']} {t['threshold']:<5} {mark}")
    return lines


def format_report(result: dict) -> str:
    """The human-readable tables of a result."""
    context = result["shape"]["context_length"]
    return "\n".join([
        *_header(result),
        *_training_table(result["train"]),
        *_eval_table(result["eval"], result["settings"]["eval_batch_size"], context),
        *_data_table(result["data"]),
        *_busy_warning(result),
        *_targets(result.get("targets")),
    ])
