"""`clipforge data {emoji,tuxpaint,icons} --root DIR`: build the offline-real image-text datasets."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def _summary(name: str, manifest: dict, folder: Path, seconds: float) -> str:
    if manifest.get("up_to_date"):
        return (f"{name}: {folder} is up to date (manifest.json has the same options); nothing to do "
                f"({seconds:.1f} s). Pass --force to rebuild.")
    if name == "emoji":
        return (f"emoji: wrote {manifest['images']} images ({manifest['concepts']} concepts x "
                f"{len(manifest['styles'])} styles: {', '.join(manifest['styles'])}; {manifest['seen']} seen / "
                f"{manifest['unseen']} unseen, seed {manifest['split_seed']}; {manifest['concepts_in_all_styles']} "
                f"concepts exist in all six styles) at {manifest['image_size']} px to {folder} in {seconds:.1f} s"
                + "".join(f"; evaluation style {s}: {manifest['images_per_style'][s]} of {manifest['concepts']} "
                          f"concepts" for s in manifest.get("eval_styles", []))
                + "".join(f"; {lang} names {n['concepts']} of {manifest['concepts']} concepts (captions-{lang}.csv)"
                          for lang, n in manifest.get("languages", {}).items()))
    if name == "icons":
        return _icons_summary(manifest, folder, seconds)
    audio = manifest.get("audio")
    sounds = (f"; {audio['recordings']} recordings of {audio['stamps']} stamps (audio.csv)" if audio else "")
    return (f"tuxpaint: wrote {manifest['stamps']} stamps in {manifest['categories']} categories at "
            f"{manifest['image_size']} px to {folder} in {seconds:.1f} s (source: {manifest['source']['kind']})"
            + sounds)


def _icons_summary(manifest: dict, folder: Path, seconds: float) -> str:
    sets = ", ".join(f"{rule} {c['sets']} ({c['icons']:,} icons)" for rule, c in manifest["dropped_sets"].items())
    icons = ", ".join(f"{rule} {n:,}" for rule, n in manifest["dropped_icons"].items())
    return (f"icons: wrote {manifest['icons']:,} icons ({manifest['sets']} sets, {manifest['stems']:,} stems) at "
            f"{manifest['image_size']} px to {folder} in {seconds:.1f} s\n  sets dropped: {sets}\n"
            f"  icons dropped (of {manifest['icons_in_kept_sets']:,} in kept sets): {icons}")


def run(args: argparse.Namespace) -> None:
    """Build the dataset named by the sub-sub-command and print a short summary."""
    from clipforge.corpora import build_emoji, build_icons, build_tuxpaint
    from clipforge.corpora.icons import read_labels

    start = time.perf_counter()
    common = {"root": args.root, "size": args.size, "limit": args.limit, "cache": args.cache, "force": args.force,
              "progress": not args.quiet}
    if args.dataset == "emoji":
        manifest = build_emoji(styles=args.styles, seed=args.seed, languages=args.languages, **common)
    elif args.dataset == "icons":
        labels = read_labels(args.exclude_labels) if args.exclude_labels else ()
        manifest = build_icons(variants=args.variants, exclude_labels=labels, workers=args.workers, **common)
    else:
        manifest = build_tuxpaint(stamps=args.stamps, audio=args.audio, **common)
    print(_summary(args.dataset, manifest, Path(args.root) / args.dataset, time.perf_counter() - start))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, required=True, help="output folder (the dataset goes to ROOT/<name>)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N concepts/stamps, or N icons (fast tests, CI)")
    p.add_argument("--cache", type=Path, default=None, help="folder for downloaded archives (default ROOT/.cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest shows the same options")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge data` with its `emoji`, `tuxpaint` and `icons` sub-commands."""
    from clipforge.corpora.emoji import EVAL_STYLES, STYLES

    p = sub.add_parser("data", help="build offline-real image-text datasets (emoji, tuxpaint, icons)",
                       description="Fetch pinned packages with npm / apt-get, render and write a training-ready "
                                   "dataset folder with captions.csv, labels.csv and manifest.json.")
    datasets = p.add_subparsers(dest="dataset", required=True)
    e = datasets.add_parser("emoji", help="six emoji styles x 1,594 concepts, CLDR captions, seen/unseen split")
    _common(e)
    e.add_argument("--styles", nargs="+", default=None, metavar="STYLE",
                   help=f"subset of styles, space- or comma-separated (default the six training styles: "
                        f"{','.join(STYLES)}); evaluation-only styles, never in the default: {','.join(EVAL_STYLES)}")
    e.add_argument("--seed", type=int, default=0, help="seen/unseen concept split seed (default 0)")
    e.add_argument("--languages", nargs="+", default=None, metavar="LANG",
                   help="also each concept's CLDR name and keywords in these languages (e.g. ko,ja): "
                        "concepts-LANG.csv and captions-LANG.csv, same images and keys")
    t = datasets.add_parser("tuxpaint", help="Tux Paint stamps with English sentences, 16 categories")
    _common(t)
    t.add_argument("--stamps", type=Path, default=None,
                   help="an unpacked tuxpaint stamps folder to read instead of the Debian package")
    t.add_argument("--audio", action="store_true",
                   help="also the stamps' recordings (sound effects, spoken names and descriptions in ~12 languages), "
                        "each paired with its stamp's picture: audio/ and audio.csv (image, audio, key, category, "
                        "kind, language, transcript, split)")
    i = datasets.add_parser("icons", help="~114k curated Iconify icons in ~150 sets, captions from names",
                            description="Curated Iconify sets (npm @iconify/json) rendered black on white; the "
                                        "counts per curation rule are printed and kept in manifest.json.")
    _common(i)
    i.add_argument("--variants", type=int, default=1,
                   help="style variants kept per set and name stem (outline, filled, ...; default 1)")
    i.add_argument("--exclude-labels", type=Path, default=None, metavar="FILE",
                   help="drop icons whose stem or alias matches a concept label: a text file (one label a line) "
                        "or a CSV with a 'label' column; the removed icons are listed in excluded.csv")
    i.add_argument("--workers", type=int, default=None, help="render processes (default min(2, CPU count))")
