"""Plain-text tables of eval results."""

from __future__ import annotations

from typing import Any


def table(report: dict[str, Any]) -> str:
    """One row per method: teacher-forced agreement, KL, generation metrics, mean layer error, parameters."""
    rows = [("nectar", report)] + list(report["baselines"].items())
    qa = "qa" in report
    head = (f"{'method':<20}{'top1':>8}{'kl':>9}{'top1 repeat':>13}{'gen sim':>9}{'prefix16':>10}{'mean err':>10}"
            + (f"{'qa acc':>8}{'qa agree':>10}" if qa else ""))
    lines = [f"n = {report['n']}, Nectar parameters = {report['nectar_params']:,} "
             f"({report['nectar_params'] / report['kv_entries']:.3f} of {report['kv_entries']:,} KV entries), "
             f"window k = {report['window_tokens']}, {report['questions']} questions, "
             f"{report['tokens_scored']} tokens; headline: {', '.join(report.get('headline_sources', []))}"
             + (f"; QA: {report['qa']['questions']} questions, full attention {report['qa']['full_accuracy']:.3f}"
                if qa else ""), head, "-" * len(head)]
    for name, r in rows:
        err = r["approx_error_by_layer"]
        repeat = r["top1_by_source"].get("repeat", float("nan"))
        lines.append(f"{name:<20}{r['top1_agreement']:>8.3f}{r['kl']:>9.4f}{repeat:>13.3f}"
                     f"{r['generation_similarity']:>9.3f}{r['generation_prefix_match']:>10.2f}"
                     f"{sum(err) / len(err):>10.4f}"
                     + (f"{r.get('qa_accuracy', float('nan')):>8.3f}{r.get('qa_agreement', float('nan')):>10.3f}" if qa else ""))
    return "\n".join(lines)
