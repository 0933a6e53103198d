"""The demo's headline table: the claims, this run's numbers and the targets they are checked against."""
from __future__ import annotations

from typing import Any

HELD_OUT_TARGET = 0.50  # held-out colour style, seen concepts, top-1 zero-shot (CLIP)
UNSEEN_TARGET = 0.25  # unseen concepts, top-1, CLIP or LiT
ROBUSTNESS_TARGET = 0.05  # effective robustness of zero-shot CLIP over the supervised trend, held-out mean
MINUTES_TARGET = 10.0  # the whole default demo, wall time (data cached)
DATA_MINUTES_TARGET = 4.0  # the first run's extra time to fetch and build the data


def _get(tree: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "not met")


def summary_rows(results: dict[str, Any], held_out: list[str], train_styles: list[str]) -> list[dict[str, str]]:
    """Rows of (claim, CLIP, LiT, supervised, target, verdict) from the demo's results."""
    colour, rows = held_out[0], []
    zs, rob = results["zero_shot"], results["robustness"]["domains"]

    def zero_shot(model: str, split: str, style: str, k: str = "top1") -> Any:
        return _get(zs, model, split, style, k)

    clip_colour, lit_unseen = zero_shot("CLIP", "seen", colour), zero_shot("LiT", "unseen", colour)
    rows.append({"claim": f"zero-shot, held-out style {colour}, seen concepts: top-1 (top-5)",
                 "CLIP": f"{_fmt(clip_colour)} ({_fmt(zero_shot('CLIP', 'seen', colour, 'top5'))})",
                 "LiT": f"{_fmt(zero_shot('LiT', 'seen', colour))} ({_fmt(zero_shot('LiT', 'seen', colour, 'top5'))})",
                 "supervised": _fmt(_get(rob, "supervised", "per_domain", colour)),
                 "target": f"CLIP >= {HELD_OUT_TARGET}", "verdict": _verdict(None if clip_colour is None else clip_colour >= HELD_OUT_TARGET)})
    for style in held_out[1:]:
        rows.append({"claim": f"zero-shot, held-out style {style}, seen concepts: top-1",
                     "CLIP": _fmt(zero_shot("CLIP", "seen", style)), "LiT": _fmt(zero_shot("LiT", "seen", style)),
                     "supervised": _fmt(_get(rob, "supervised", "per_domain", style)), "target": "", "verdict": ""})
    unseen_mean = {m: _mean([zero_shot(m, "unseen", s) for s in train_styles + held_out]) for m in ("CLIP", "LiT")}
    best_unseen = max([v for v in (zero_shot("CLIP", "unseen", colour), lit_unseen) if v is not None], default=None)
    rows.append({"claim": f"zero-shot, unseen concepts, {colour}: top-1 (mean over all styles)",
                 "CLIP": f"{_fmt(zero_shot('CLIP', 'unseen', colour))} ({_fmt(unseen_mean['CLIP'])})",
                 "LiT": f"{_fmt(lit_unseen)} ({_fmt(unseen_mean['LiT'])})", "supervised": "cannot",
                 "target": f"CLIP or LiT >= {UNSEEN_TARGET}",
                 "verdict": _verdict(None if best_unseen is None else best_unseen >= UNSEEN_TARGET)})
    ablation = {m: _get(results, "prompt_ablation", m, "mean") for m in ("CLIP", "LiT")}
    cell = {m: "n/a" if not a else " / ".join(f"{a[k]:.3f}" for k in ("label", "default template", "chosen template",
                                                                         "ensemble"))
            for m, a in ablation.items()}
    ordered = all(a and a["ensemble"] >= a["chosen template"] >= a["label"] for a in ablation.values())
    validation = _get(results, "prompt_ablation", "validation_style")
    rows.append({"claim": f"prompts (template chosen on {validation}; mean of the other held-out styles): label / "
                          "default / chosen template / ensemble", "CLIP": cell["CLIP"], "LiT": cell["LiT"],
                 "supervised": "", "target": "ensemble >= chosen template >= label", "verdict": _verdict(ordered)})
    retained = {m: _get(rob, m, "retained") for m in ("CLIP zero-shot", "LiT zero-shot", "supervised")}
    id_acc = {m: _get(rob, m, "in_distribution") for m in retained}
    rows.append({"claim": "in-distribution top-1 (held-out images of the training styles)",
                 "CLIP": _fmt(id_acc["CLIP zero-shot"]), "LiT": _fmt(id_acc["LiT zero-shot"]),
                 "supervised": _fmt(id_acc["supervised"]), "target": "", "verdict": ""})
    rows.append({"claim": "share of in-distribution accuracy kept on held-out styles",
                 "CLIP": _fmt(retained["CLIP zero-shot"]), "LiT": _fmt(retained["LiT zero-shot"]),
                 "supervised": _fmt(retained["supervised"]), "target": "", "verdict": ""})
    er = {m: _get(results, "effective_robustness", "models", m, "mean") for m in ("CLIP zero-shot", "LiT zero-shot")}
    rows.append({"claim": "effective robustness over the supervised trend (mean of held-out styles)",
                 "CLIP": _signed(er["CLIP zero-shot"]), "LiT": _signed(er["LiT zero-shot"]), "supervised": "0 (the trend)",
                 "target": f"CLIP >= +{ROBUSTNESS_TARGET}",
                 "verdict": _verdict(None if er["CLIP zero-shot"] is None else er["CLIP zero-shot"] >= ROBUSTNESS_TARGET)})
    shots = _get(results, "few_shot", "probes") or {}
    rows.append({"claim": f"zero-shot on {colour} vs k-shot linear probes (k = {', '.join(str(k) for k in shots)}): "
                          "zero-shot is worth k labels per class",
                 "CLIP": f"{_fmt(_get(results, 'few_shot', 'zero_shot'))} vs "
                         f"{' / '.join(_fmt(p['top1']) for p in shots.values())}: k "
                         f"{_get(results, 'few_shot', 'zero_shot_matches_k') or 'n/a'}",
                 "LiT": "", "supervised": "", "target": "", "verdict": ""})
    for name in [m for m in zs if m not in ("CLIP", "LiT")]:  # the data ablation (--ablation 1)
        er_extra = _get(results, "effective_robustness", "models", f"{name} zero-shot", "mean")
        rows.append({"claim": f"data ablation, {name}, same steps: {colour} seen top-1 / unseen top-1 / effective "
                              f"robustness (this run's CLIP, {results.get('data_setting')}, in the CLIP column)",
                     "CLIP": f"{_fmt(zero_shot('CLIP', 'seen', colour))} / {_fmt(zero_shot('CLIP', 'unseen', colour))} "
                             f"/ {_signed(er['CLIP zero-shot'])}",
                     "LiT": f"{_fmt(zero_shot(name, 'seen', colour))} / {_fmt(zero_shot(name, 'unseen', colour))} / "
                            f"{_signed(er_extra)}", "supervised": "", "target": "", "verdict": ""})
    probe = _get(rob, "CLIP linear probe", "per_domain", colour)
    rows.append({"claim": f"linear probe on CLIP features (fit on training styles), {colour} top-1", "CLIP": _fmt(probe),
                 "LiT": "", "supervised": "", "target": "", "verdict": ""})
    tux = _get(results, "robustness", "tuxpaint", "ensemble", "top1")
    classes = _get(results, "robustness", "tuxpaint", "classes")
    rows.append({"claim": f"zero-shot Tux Paint stamps ({classes}-way categories, photos and clip art)", "CLIP": _fmt(tux),
                 "LiT": "", "supervised": "cannot", "target": "", "verdict": ""})
    ret = results.get("retrieval", {})
    rows.append({"claim": f"retrieval R@1 image->text / text->image ({colour}, seen)",
                 **{m: f"{_fmt(_get(ret, m, 'image_to_text_r1'))} / {_fmt(_get(ret, m, 'text_to_image_r1'))}" for m in ("CLIP", "LiT")},
                 "supervised": "", "target": "", "verdict": ""})
    return rows


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def claims(rows: list[dict[str, str]], results: dict[str, Any], minutes: float,
           data_minutes: float = 0.0) -> list[dict[str, Any]]:
    """Every summary row as a record {id, claim, value, target, met}, plus the wall-time targets.

    A finding without a target (few-shot, ablation, retrieval, ...) has target None and met None.
    """
    out = []
    for row in rows:
        out.append({"id": _slug(row["claim"]), "claim": row["claim"],
                    "value": {k: row[k] for k in ("CLIP", "LiT", "supervised") if row.get(k)},
                    "target": row.get("target") or None, "met": {"met": True, "not met": False}.get(row.get("verdict"))})
    out.append({"id": "wall-time", "claim": "the whole demo's wall time without the data build (minutes)",
                "value": round(minutes, 2), "target": f"<= {MINUTES_TARGET}", "met": minutes <= MINUTES_TARGET})
    if data_minutes:
        out.append({"id": "data-build-time", "claim": "the first run's data fetch and build (minutes)",
                    "value": round(data_minutes, 2), "target": f"<= {DATA_MINUTES_TARGET}",
                    "met": data_minutes <= DATA_MINUTES_TARGET})
    return out


def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:60]


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
