"""Comparison reports: report.md, self-contained report.html and the terminal table, rendered from a
:class:`~toolkit.artifacts.comparison.Comparison` (which writes report.json itself).

The markdown and HTML are rendered from one list of blocks so they always say the same thing.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from eval.metrics import RSNA_WEIGHTS
from toolkit.artifacts.comparison import AUCInterval, Comparison, Delta, LevelComparison
from toolkit.artifacts.run import OrganSettings

Block = tuple  # ("h1"|"h2"|"h3"|"p"|"warn", text) | ("table", headers, rows) | ("img", name, alt)


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _num(x: Any) -> str:
    """Audit figures: counts as integers, anything else to 4 significant digits."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e12 else f"{x:.4g}"


def _p(p: Any) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _ci(auc: AUCInterval) -> str:
    return f"{_f(auc.estimate)} [{_f(auc.low)}, {_f(auc.high)}]"


def _delta(vs: Delta) -> str:
    return f"{vs.delta:+.3f} [{_f(vs.ci_low)}, {_f(vs.ci_high)}]" if math.isfinite(vs.delta) else "n/a"


def _level(vs: Delta) -> str:
    """The CI's confidence level: ``98.3%`` (Holm-matched levels are not round)."""
    return "n/a" if not math.isfinite(vs.ci_level) else f"{100 * vs.ci_level:.4g}%"


def _ratio(result: Comparison, name: str) -> str:
    r = result.runs[name].synthetic_ratio
    return "n/a" if r is None else f"{float(r):g}"


def summary_rows(result: Comparison) -> list[list[str]]:
    """Patient-level headline rows: organ, run, synthetic ratio, AUC [CI], delta [CI], CI level, p,
    Holm-adjusted p, verdict."""
    rows = []
    for organ, res in result.organs.items():
        for name, entry in res.patient.runs.items():
            vs = entry.vs_baseline
            rows.append(
                [
                    organ,
                    name,
                    _ratio(result, name),
                    _ci(entry.auc),
                    _delta(vs) if vs else "baseline",
                    _level(vs) if vs else "",
                    _p(vs.p) if vs else "",
                    _p(vs.p_adjusted) if vs else "",
                    vs.verdict if vs else "",
                ]
            )
    return rows


SUMMARY_HEADERS = [
    "organ",
    "run",
    "synthetic ratio",
    "AUC [95% CI]",
    "Δ AUC [CI]",
    "CI level (Holm)",
    "p (DeLong)",
    "p (Holm)",
    "verdict",
]


def _level_table(level: LevelComparison) -> Block:
    headers = [
        "run",
        "AUC [CI]",
        "mean fold AUC",
        "Δ AUC [CI]",
        "CI level",
        "p",
        "verdict",
        "full-sens. threshold",
        "specificity",
        "accuracy",
        "Youden sens.",
        "Youden spec.",
    ]
    rows = []
    for name, e in level.runs.items():
        vs = e.vs_baseline
        fs, yd = e.full_sensitivity, e.youden
        rows.append(
            [
                name,
                _ci(e.auc),
                _f(e.mean_fold_auc),
                _delta(vs) if vs else "baseline",
                _level(vs) if vs else "",
                _p(vs.p) if vs else "",
                vs.verdict if vs else "",
                _f(fs.threshold),
                _f(fs.specificity),
                _f(fs.accuracy),
                _f(yd.sensitivity),
                _f(yd.specificity),
            ]
        )
    return ("table", headers, rows)


METHODS = (
    "Every run was scored on the same held-out test patients (identical split hash, patients and "
    "labels, checked before comparing). Test patients were never seen by the generators or the "
    "classifiers; synthetic slices were only ever added to training folds, never to validation folds "
    "or the test set. Each run's test prediction is the mean of its K fold models; a patient's score "
    "is the run's slice-to-patient aggregate. AUC confidence intervals are percentile bootstraps that "
    "resample patients (all slices of a drawn patient together), {n_boot} resamples, seed {seed}. "
    "The change in AUC vs the baseline is tested with the paired DeLong test (fast midrank algorithm, "
    "Sun & Xu 2014) and bounded by a paired patient bootstrap. Verdicts are given at patient level only "
    "and corrected for multiplicity with Holm's step-down procedure across all {m} comparisons (organs x "
    "compared runs), which keeps the chance of any false verdict at or below {alpha}: a run is called "
    "improved (worse) for an organ only when the Holm-adjusted p < {alpha} and the paired-bootstrap CI, "
    "computed at the level that comparison was tested at (1 - {alpha}/k for the k-th smallest p counted "
    "from the top; the 'CI level' column), lies entirely above (below) 0. Anything else is reported as no "
    "evidence of change, whatever the point estimate. Slice-level figures and every AUC interval of a "
    "single run ({ci:.0%}) are descriptive and carry no verdict."
)

CAVEATS = [
    "Verdicts are Holm-corrected across organs and runs; with many comparisons a real but small change "
    "can stay 'no evidence of change'. One run compared on one organ is tested at the plain level.",
    "Patient scores are slice aggregates (e.g. the maximum), not calibrated probabilities; the RSNA "
    "log loss rewards calibration and is shown for reference only. Graded organs (kidney, liver, "
    "spleen) enter it only when a run gives healthy/low/high probabilities, so the score is not the "
    "leaderboard figure unless no group is left out.",
    "Slice-level figures use each slice's own label; slices of one patient are correlated, which is "
    "why their intervals still resample patients. DeLong's test treats slices as independent, so "
    "slice-level p-values are optimistic; the patient-bootstrap CI is the figure to trust there.",
    "A single seed and test split: differences of a few AUC points are within what retraining alone can produce.",
]


def _classifier_text(settings: OrganSettings | None) -> str:
    """How this organ's classifiers saw the slices (``train.organs`` may differ per organ)."""
    if settings is None:
        return ""
    text = f"Classifiers: {settings.image_size} px slices"
    blocks = settings.trainable_blocks
    if blocks is not None:
        n = int(blocks)
        if n < 0:
            text += ", every layer fine-tuned"
        elif n == 0:
            text += ", only the head fine-tuned"
        else:
            text += f", the last {n} block(s) and the head fine-tuned"
    return text + "."


def build_blocks(result: Comparison) -> list[Block]:
    """The report as an ordered list of blocks (rendered to markdown and HTML)."""
    base = result.baseline
    ev = result.eval
    others = result.others
    first = next(iter(result.organs.values()))
    blocks: list[Block] = [
        ("h1", "Does synthetic CT improve the injury classifier?"),
        (
            "p",
            f"Baseline '{base}' (real slices only) vs {', '.join(repr(n) for n in others)}. "
            f"Test set: {first.patient.n_patients} patients, split hash "
            f"{result.runs[base].split_hash}.",
        ),
    ]
    if result.settings_mismatch:
        diffs = "; ".join(
            f"{k}: " + ", ".join(f"{n}={v}" for n, v in vals.items()) for k, vals in result.settings_mismatch.items()
        )
        blocks.append(
            (
                "warn",
                "WARNING: these runs differ in more than the synthetic data, so a difference cannot be "
                f"attributed to it: {diffs}.",
            )
        )
    for note in result.notes:
        blocks.append(("warn", note))
    low = {o: r.patient.n_positive for o, r in result.organs.items() if r.low_power}
    if low:
        counts = ", ".join(f"{o} ({n})" for o, n in low.items())
        blocks.append(
            (
                "warn",
                f"Fewer than {ev.min_positives} injured test patients for {counts}: those comparisons have "
                "little power and their intervals cover less often than their level says.",
            )
        )
    blocks.append(("h2", "Summary (patient level)"))
    blocks.append(("table", SUMMARY_HEADERS, summary_rows(result)))
    blocks.append(("img", "auc_delta", "AUC change vs baseline per organ"))

    for organ, res in result.organs.items():
        pl, sl = res.patient, res.slice
        blocks.append(("h2", organ))
        blocks.append(
            (
                "p",
                f"Test set: {pl.n} patients ({pl.n_positive} injured), {sl.n} slices "
                f"({sl.n_positive} injured). {_classifier_text(res.settings)}".rstrip(),
            )
        )
        if res.note:
            blocks.append(("warn", res.note))
        reason = pl.runs[base].auc_reason
        if reason:
            blocks.append(("warn", f"Patient-level AUC undefined: {reason}."))
        blocks.append(("h3", "Patient level (headline)"))
        blocks.append(_level_table(pl))
        blocks.append(("img", f"roc_{organ}", f"ROC curves, {organ}, test patients"))
        blocks.append(("h3", "Slice level"))
        blocks.append(_level_table(sl))
        if res.generators:
            blocks.append(("h3", "Generator audit (synthetic runs)"))
            gens = res.generators
            keys = sorted({k for g in gens.values() for k in g.audit})
            rows = [["generator"] + [str(g.generator_id or "n/a") for g in gens.values()]]
            rows += [[k] + [_num(g.audit.get(k)) for g in gens.values()] for k in keys]
            blocks.append(("table", ["figure"] + list(gens), rows))
            for name, g in gens.items():
                if g.summary:
                    blocks.append(("p", f"{name}: {g.summary}"))
            if not keys:
                blocks.append(("p", "No audit figures recorded for these generators."))

    blocks.append(("h2", "RSNA 2023 weighted log loss (test patients)"))
    groups = list(RSNA_WEIGHTS)
    rows = []
    for name, ll in result.rsna_log_loss.items():
        rows.append([name, _f(ll.score)] + [_f(ll.groups[g]) if g in ll.groups else "left out" for g in groups])
    blocks.append(("table", ["run", "mean of available groups"] + groups, rows))
    reasons = {g: r for ll in result.rsna_log_loss.values() for g, r in ll.left_out.items()}
    if reasons:
        blocks.append(("p", "Left out: " + "; ".join(f"{g} ({r})" for g, r in reasons.items()) + "."))

    blocks.append(("h2", "Methods"))
    m = sum(e.vs_baseline is not None for res in result.organs.values() for e in res.patient.runs.values())
    blocks.append(("p", METHODS.format(n_boot=ev.bootstrap, seed=ev.seed, ci=ev.ci, alpha=ev.alpha, m=m)))
    blocks.append(("h2", "Caveats"))
    for c in CAVEATS:
        blocks.append(("li", c))
    return blocks


def render_markdown(blocks: list[Block], images: dict[str, Path]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + block[1] + "\n")
        elif kind == "p":
            out.append(block[1] + "\n")
        elif kind == "warn":
            out.append(f"> **{block[1]}**\n")
        elif kind == "li":
            out.append(f"- {block[1]}")
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img" and block[1] in images:
            out.append(f"![{block[2]}]({images[block[1]].name})\n")
    return "\n".join(out) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.6em 0;font-size:0.88em}"
    "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f2f2f2}"
    ".warn{background:#fff4e5;border-left:4px solid #e69500;padding:0.5em 0.8em}"
    "td.improved{color:#1a7f37;font-weight:600}td.worse{color:#b42318;font-weight:600}"
    "img{max-width:100%}"
)


def render_html(blocks: list[Block], images: dict[str, Path], title: str = "toolkit compare") -> str:
    """A single HTML file: plots embedded as base64 PNG data URIs, no external resources."""
    e = html.escape
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{_CSS}</style>"
        "</head><body>"
    ]
    in_list = False
    for block in blocks:
        kind = block[0]
        if kind != "li" and in_list:
            out.append("</ul>")
            in_list = False
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(block[1])}</p>")
        elif kind == "warn":
            out.append(f"<p class='warn'>{e(block[1])}</p>")
        elif kind == "li":
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{e(block[1])}</li>")
        elif kind == "table":
            headers, rows = block[1], block[2]
            cells = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>"]
            for row in rows:
                tds = "".join(
                    f"<td class='{str(c).split()[0]}'>{e(str(c))}</td>"
                    if str(c) in ("improved", "worse")
                    else f"<td>{e(str(c))}</td>"
                    for c in row
                )
                cells.append(f"<tr>{tds}</tr>")
            out.append("".join(cells) + "</table>")
        elif kind == "img" and block[1] in images:
            data = base64.b64encode(Path(images[block[1]]).read_bytes()).decode("ascii")
            out.append(f"<p><img alt='{e(block[2])}' src='data:image/png;base64,{data}'></p>")
    if in_list:
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def write_markdown(result: Comparison, path: Path, images: dict[str, Path]) -> Path:
    path.write_text(render_markdown(build_blocks(result), images))
    return path


def write_html(result: Comparison, path: Path, images: dict[str, Path]) -> Path:
    path.write_text(render_html(build_blocks(result), images))
    return path


def summary_table(result: Comparison):
    """A rich Table of the patient-level headline (for the terminal), one section per organ.

    Narrower than the report's table: the Holm-adjusted p-value only (the CI level is in the report).
    """
    from rich.table import Table

    table = Table(title=f"test AUC by organ vs '{result.baseline}' (patient level, Holm-corrected verdicts)")
    for h in ("organ", "run", "ratio", "AUC [95% CI]", "Δ AUC [CI]", "p (Holm)", "verdict"):
        left = h in ("organ", "run", "verdict")
        # Cells wrap (at spaces) in narrow terminals; names and verdicts keep a readable width.
        table.add_column(h, justify="left" if left else "right", min_width=9 if left else None)
    styles = {"improved": "bold green", "worse": "bold red"}
    organ = None
    for row in summary_rows(result):
        organ_, run, ratio, auc, delta, _level, _p_raw, p_holm, verdict_ = row
        if organ is not None and organ_ != organ:
            table.add_section()
        organ = organ_
        shown = f"[{styles[verdict_]}]{verdict_}[/]" if verdict_ in styles else verdict_
        table.add_row(organ_, run, ratio, auc, delta, p_holm, shown)
    return table
