"""The demo's headline table: the claims, this run's numbers and the targets they are checked against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipforge.demo.robustness import zero_shot_method
from clipforge.evaluate.tasks import CLIP_LINEAR_PROBE, CLIP_ZERO_SHOT, SUPERVISED

HELD_OUT_TARGET = 0.50  # held-out colour style, seen concepts, top-1 zero-shot (CLIP)
UNSEEN_TARGET = 0.25  # unseen concepts, top-1, CLIP or LiT
ROBUSTNESS_TARGET = 0.05  # effective robustness of zero-shot CLIP over the supervised trend, held-out mean
MINUTES_TARGET = 10.0  # the whole default demo, wall time (data cached)
DATA_MINUTES_TARGET = 4.0  # the first run's extra time to fetch and build the data
MATMUL_SHARE_TARGET = 0.35  # CLIP training's achieved FLOP rate over the best matmul rate of its precision
OBJECTIVE_FACTOR_TARGET = 3.0  # images CLIP saves over each predictive objective (the paper: ~4x and ~12x)
LIT_ZERO_SHOT = zero_shot_method("LiT")


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


@dataclass
class _Findings:
    """Lookups into the demo's results; None where a number is missing (e.g. a style a small subset lacks)."""

    results: dict[str, Any]
    colour: str  # the first held-out style: the headline numbers are measured there

    def zero_shot(self, model: str, split: str, style: str, k: str = "top1") -> Any:
        """Zero-shot metric `k` of a model (by name) on one split and style."""
        return _get(self.results["zero_shot"], model, split, style, k)

    def method(self, method: str, *keys: str) -> Any:
        """A robustness number of a method (by id): in_distribution, retained, per_domain/STYLE, ..."""
        return _get(self.results["robustness"]["domains"], method, *keys)

    def er(self, method: str) -> Any:
        """A method's mean effective robustness over the supervised trend."""
        return _get(self.results, "effective_robustness", "models", method, "mean")


def _row(claim: str, clip: str = "", lit: str = "", supervised: str = "", target: str = "",
         verdict: str = "") -> dict[str, str]:
    return {"claim": claim, "CLIP": clip, "LiT": lit, "supervised": supervised, "target": target, "verdict": verdict}


def finding_row(claim: str, value: str, target: str, met: bool | None) -> dict[str, str]:
    """A summary row of one measured claim (its value in the CLIP column) and its target."""
    return _row(claim, value, target=target, verdict=_verdict(met))


def summary_rows(results: dict[str, Any], held_out: list[str], train_styles: list[str]) -> list[dict[str, str]]:
    """Rows of (claim, CLIP, LiT, supervised, target, verdict) from the demo's results."""
    found = _Findings(results, held_out[0])
    return [*_held_out_rows(found, held_out), _unseen_row(found, train_styles + held_out), _prompt_row(results),
            *_robustness_rows(found), _few_shot_row(found), *_ablation_rows(found), _probe_row(found),
            _tuxpaint_row(results), _retrieval_row(results, found.colour), _throughput_row(results),
            *_finetune_rows(results), *_objective_rows(results), *_captioning_rows(results),
            *(results.get("binding") or {}).get("rows", [])]


def _held_out_rows(found: _Findings, held_out: list[str]) -> list[dict[str, str]]:
    """Zero-shot top-1 on each held-out style (seen concepts); the first (colour) one has the target and top-5."""
    colour, zero_shot = found.colour, found.zero_shot
    clip_colour = zero_shot("CLIP", "seen", colour)
    rows = [_row(f"zero-shot, held-out style {colour}, seen concepts: top-1 (top-5)",
                 f"{_fmt(clip_colour)} ({_fmt(zero_shot('CLIP', 'seen', colour, 'top5'))})",
                 f"{_fmt(zero_shot('LiT', 'seen', colour))} ({_fmt(zero_shot('LiT', 'seen', colour, 'top5'))})",
                 _fmt(found.method(SUPERVISED, "per_domain", colour)), f"CLIP >= {HELD_OUT_TARGET}",
                 _verdict(None if clip_colour is None else clip_colour >= HELD_OUT_TARGET))]
    for style in held_out[1:]:
        rows.append(_row(f"zero-shot, held-out style {style}, seen concepts: top-1",
                         _fmt(zero_shot("CLIP", "seen", style)), _fmt(zero_shot("LiT", "seen", style)),
                         _fmt(found.method(SUPERVISED, "per_domain", style))))
    return rows


def _unseen_row(found: _Findings, styles: list[str]) -> dict[str, str]:
    """Zero-shot top-1 on concepts no caption named: on the colour style, and the mean over all styles."""
    colour, zero_shot = found.colour, found.zero_shot
    clip_unseen, lit_unseen = zero_shot("CLIP", "unseen", colour), zero_shot("LiT", "unseen", colour)
    unseen_mean = {m: _mean([zero_shot(m, "unseen", s) for s in styles]) for m in ("CLIP", "LiT")}
    best_unseen = max([v for v in (clip_unseen, lit_unseen) if v is not None], default=None)
    return _row(f"zero-shot, unseen concepts, {colour}: top-1 (mean over all styles)",
                f"{_fmt(clip_unseen)} ({_fmt(unseen_mean['CLIP'])})",
                f"{_fmt(lit_unseen)} ({_fmt(unseen_mean['LiT'])})", "cannot", f"CLIP or LiT >= {UNSEEN_TARGET}",
                _verdict(None if best_unseen is None else best_unseen >= UNSEEN_TARGET))


def _prompt_row(results: dict[str, Any]) -> dict[str, str]:
    """The prompt ablation's means: bare label / default / chosen template / ensemble."""
    ablation = {m: _get(results, "prompt_ablation", m, "mean") for m in ("CLIP", "LiT")}
    cell = {m: "n/a" if not a else " / ".join(f"{a[k]:.3f}" for k in ("label", "default template", "chosen template",
                                                                         "ensemble"))
            for m, a in ablation.items()}
    ordered = all(a and a["ensemble"] >= a["chosen template"] >= a["label"] for a in ablation.values())
    validation = _get(results, "prompt_ablation", "validation_style")
    return _row(f"prompts (template chosen on {validation}; mean of the other held-out styles): label / "
                "default / chosen template / ensemble", cell["CLIP"], cell["LiT"], "",
                "ensemble >= chosen template >= label", _verdict(ordered))


def _robustness_rows(found: _Findings) -> list[dict[str, str]]:
    """In-distribution top-1, the share of it kept on held-out styles, and effective robustness."""
    methods = (CLIP_ZERO_SHOT, LIT_ZERO_SHOT, SUPERVISED)
    id_acc = [_fmt(found.method(m, "in_distribution")) for m in methods]
    retained = [_fmt(found.method(m, "retained")) for m in methods]
    clip_er = found.er(CLIP_ZERO_SHOT)
    return [_row("in-distribution top-1 (held-out images of the training styles)", *id_acc),
            _row("share of in-distribution accuracy kept on held-out styles", *retained),
            _row("effective robustness over the supervised trend (mean of held-out styles)", _signed(clip_er),
                 _signed(found.er(LIT_ZERO_SHOT)), "0 (the trend)", f"CLIP >= +{ROBUSTNESS_TARGET}",
                 _verdict(None if clip_er is None else clip_er >= ROBUSTNESS_TARGET))]


def _finetune_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """--finetune 1: fitting the training styles raises in-distribution top-1 and lowers effective robustness;
    a WiSE-FT mixture beats both ends on the held-out styles (the paper's Figure 14; Wortsman et al. 2022)."""
    tuned = results.get("finetune")
    if not tuned:
        return []
    zero, ce = tuned["methods"]["zero-shot"] or {}, tuned["methods"]["ce"] or {}
    gain = None if not zero or not ce else ce["in_distribution"] > zero["in_distribution"]
    ers = (ce.get("effective_robustness"), zero.get("effective_robustness"))
    lower = None if None in ers else ers[0] < ers[1]
    best = next(p for p in tuned["wise"] if p["alpha"] == tuned["best_alpha"])
    ends = (tuned["wise"][0].get("held_out_mean"), tuned["wise"][-1].get("held_out_mean"))
    return [_row("fine-tuned (cross-entropy) vs zero-shot CLIP: in-distribution top-1",
                 f"{_fmt(ce.get('in_distribution'))} vs {_fmt(zero.get('in_distribution'))}", "", "",
                 "fine-tuned > zero-shot", _verdict(gain)),
            _row("fine-tuned (cross-entropy) vs zero-shot CLIP: effective robustness",
                 f"{_signed(ers[0])} vs {_signed(ers[1])}", "", "", "fine-tuned < zero-shot", _verdict(lower)),
            _row("WiSE-FT: held-out mean top-1 at the best alpha vs zero-shot / fine-tuned",
                 f"alpha {best['alpha']:g}: {_fmt(best.get('held_out_mean'))} vs {_fmt(ends[0])} / {_fmt(ends[1])}",
                 "", "", "above both ends", _verdict(tuned["wise_above_both_ends"]))]


def _objective_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """--objectives 1: how many times fewer images contrastive CLIP needs to reach each predictive model's final
    zero-shot accuracy (the paper's Figure 2: the same direction, >= 3x)."""
    factors = (results.get("objectives") or {}).get("factors", {})
    rows = []
    for name, label in (("bag_of_words", "bag-of-n-grams prediction"), ("caption_lm", "a caption language model")):
        found = factors.get(name)
        if found is None:
            continue
        factor = found["factor"]
        cell = ("never reached" if found["clip_images_to_reach"] is None else
                "at chance" if factor is None else f"{factor:.1f}x")
        rows.append(_row(f"contrastive needs fewer images than {label} to reach its final zero-shot top-1 "
                         f"({found['final_top1']:.3f})", cell, target=f"CLIP >= {OBJECTIVE_FACTOR_TARGET:g}x",
                         verdict=_verdict(found["met"])))
    return rows


def _captioning_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """--captioning 1: CoCa's held-out CIDEr-D and BLEU-4 next to the nearest-training-caption baseline."""
    found = results.get("captioning")
    if not found:
        return []
    coca, retrieved = found["scores"].values()
    return [_row(f"CoCa captions vs retrieval baseline ({found['style']}, seen): CIDEr-D / BLEU-4",
                 f"CoCa {coca['cider_d']:.3f} / {coca['bleu4']:.3f} vs retrieval {retrieved['cider_d']:.3f} / "
                 f"{retrieved['bleu4']:.3f}")]


def _few_shot_row(found: _Findings) -> dict[str, str]:
    """Zero-shot on the colour style against k-shot linear probes: how many labels per class it is worth."""
    results = found.results
    shots = _get(results, "few_shot", "probes") or {}
    return _row(f"zero-shot on {found.colour} vs k-shot linear probes (k = {', '.join(str(k) for k in shots)}): "
                "zero-shot is worth k labels per class",
                f"{_fmt(_get(results, 'few_shot', 'zero_shot'))} vs "
                f"{' / '.join(_fmt(p['top1']) for p in shots.values())}: k "
                f"{_get(results, 'few_shot', 'zero_shot_matches_k') or 'n/a'}")


def _ablation_rows(found: _Findings) -> list[dict[str, str]]:
    """The data ablation (--ablation 1): each other data setting's CLIP against this run's, same steps."""
    colour, zero_shot, results = found.colour, found.zero_shot, found.results
    clip = (f"{_fmt(zero_shot('CLIP', 'seen', colour))} / {_fmt(zero_shot('CLIP', 'unseen', colour))} "
            f"/ {_signed(found.er(CLIP_ZERO_SHOT))}")
    return [_row(f"data ablation, {name}, same steps: {colour} seen top-1 / unseen top-1 / effective "
                 f"robustness (this run's CLIP, {results.get('data_setting')}, in the CLIP column)", clip,
                 f"{_fmt(zero_shot(name, 'seen', colour))} / {_fmt(zero_shot(name, 'unseen', colour))} / "
                 f"{_signed(found.er(zero_shot_method(name)))}")
            for name in results["zero_shot"] if name.startswith("CLIP (")]  # the ablation's CLIPs only


def _probe_row(found: _Findings) -> dict[str, str]:
    """The linear probe on CLIP's features (fit on the training styles) on the colour style."""
    return _row(f"linear probe on CLIP features (fit on training styles), {found.colour} top-1",
                _fmt(found.method(CLIP_LINEAR_PROBE, "per_domain", found.colour)))


def _tuxpaint_row(results: dict[str, Any]) -> dict[str, str]:
    """Zero-shot CLIP on the Tux Paint stamps."""
    tux = _get(results, "robustness", "tuxpaint", "ensemble", "top1")
    classes = _get(results, "robustness", "tuxpaint", "classes")
    return _row(f"zero-shot Tux Paint stamps ({classes}-way categories, photos and clip art)", _fmt(tux), "",
                "cannot")


def _retrieval_row(results: dict[str, Any], colour: str) -> dict[str, str]:
    """Retrieval R@1 both ways for CLIP and LiT."""
    ret = results.get("retrieval", {})
    cells = [f"{_fmt(_get(ret, m, 'image_to_text_r1'))} / {_fmt(_get(ret, m, 'text_to_image_r1'))}"
             for m in ("CLIP", "LiT")]
    return _row(f"retrieval R@1 image->text / text->image ({colour}, seen)", *cells)


def _throughput_row(results: dict[str, Any]) -> dict[str, str]:
    """CLIP training's achieved GFLOP/s over the best matmul GFLOP/s of its precision, measured in the run."""
    got = results.get("throughput") or {}
    share = got.get("share")
    cell = "n/a" if share is None else (f"{share:.0%}: {got['achieved_gflops']:.0f} of {got['best_matmul_gflops']:.0f} "
                                        f"GFLOP/s ({got['precision']}, {got['gflop_per_step']:.1f} GFLOP a step)")
    return _row("CLIP training speed: share of the best matmul rate of its precision on this machine", cell,
                target=f"CLIP >= {MATMUL_SHARE_TARGET:.0%}",
                verdict=_verdict(None if share is None else share >= MATMUL_SHARE_TARGET))


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
                    "target": row.get("target") or None,
                    "met": {"met": True, "not met": False}.get(row.get("verdict"))})
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
