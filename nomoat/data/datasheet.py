"""The datasheet of a built recipe: datasheet.json (every source's counts in and out, drops by reason, input
hashes), datasheet.md (the same for a reader) and mixture.png (each source's share of tokens).

Not here: counting (stages.py counts into the per-source reports while the corpus is built, corpus.py calls
`write_datasheet` with them), and anything about the shards beyond their manifest's totals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

from nomoat.data.recipe import Recipe
from nomoat.files import file_sha256, write_text_atomic

_MD_FILES = 20  # input files listed per source in datasheet.md; datasheet.json lists them all


def write_datasheet(
    folder: Path, recipe: Recipe, recipe_path: Path, reports: list[dict], manifest: dict, fingerprint: str
) -> None:
    """datasheet.json, datasheet.md and mixture.png in `folder`, from the sources' reports and the manifest."""
    sheet = datasheet(recipe, recipe_path, reports, manifest, fingerprint)
    (folder / "datasheet.json").write_text(json.dumps(sheet, indent=2, sort_keys=True) + "\n")
    (folder / "datasheet.md").write_text(markdown(sheet))
    plot_mixture(sheet, folder / "mixture.png")


def drop_summary(report: dict) -> str:
    drops = Counter(report["filter_drops"])
    for key in ("meta_filtered", "exact_duplicates", "near_duplicates", "contaminated"):
        drops[key] = report[key]
    shown = ", ".join(f"{k} {v}" for k, v in sorted(drops.items()) if v)
    return f"{report['documents_in']} documents in, dropped: {shown or 'none'}"


def datasheet(recipe: Recipe, recipe_path: Path, reports: list[dict], manifest: dict, fingerprint: str) -> dict:
    total_tokens = sum(s["tokens"] for s in manifest["inputs"]) or 1
    sources = []
    for report, out in zip(reports, manifest["inputs"], strict=True):
        sources.append(
            {
                **report,
                "filter_drops": dict(sorted(report["filter_drops"].items())),
                "contaminated_by": dict(sorted(report["contaminated_by"].items())),
                "documents_out": out["documents"],
                "bytes_out": out["bytes"],
                "tokens_out": out["tokens"],
                "token_share": round(out["tokens"] / total_tokens, 6),
            }
        )
    return {
        "recipe_sha256": hashlib.sha256(recipe_path.read_bytes()).hexdigest(),
        "fingerprint": fingerprint,
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "clean": dataclasses.asdict(recipe.clean) | {"strip_gutenberg": recipe.strip_gutenberg},
        "dedup": None if recipe.dedup is None else dataclasses.asdict(recipe.dedup),
        "decontaminate": None if recipe.decontaminate is None else dataclasses.asdict(recipe.decontaminate),
        "sources": sources,
        "splits": {name: {k: s[k] for k in ("documents", "tokens", "bytes")} for name, s in manifest["splits"].items()},
    }


def markdown(sheet: dict) -> str:
    lines = [
        "# Datasheet",
        "",
        f"Recipe sha256 `{sheet['recipe_sha256']}`, tokenizer sha256 `{sheet['tokenizer_sha256']}`.",
        "",
        "| source | weight | docs in | docs out | bytes in | bytes out | tokens out | share | license |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in sheet["sources"]:
        lines.append(
            f"| {s['name']} | {s['weight']:g} | {s['documents_in']:,} | {s['documents_out']:,} | {s['bytes_in']:,} "
            f"| {s['bytes_out']:,} | {s['tokens_out']:,} | {s['token_share']:.1%} | {s['license'] or '?'} |"
        )
    lines += [
        "",
        "The out columns count copies: a source's weight repeats each document it keeps (weight 2: twice; a "
        "fraction repeats that share of them, picked by a hash of their text), so above a weight of 1 more "
        "documents can come out than went in. Each source below says how many distinct documents it kept.",
    ]
    for s in sheet["sources"]:
        lines += ["", f"## {s['name']}", "", f"- path: `{s['path']}`" + (f", from {s['url']}" if s["url"] else "")]
        lines.append(f"- dropped: {drop_summary(s).partition('dropped: ')[2]}")
        lines.append(
            f"- kept {s['unique_documents_out']:,} distinct documents; weight {s['weight']:g} makes them "
            f"{s['documents_out']:,}"
        )
        if s["bad_lines"]:
            lines.append(f"- JSON lines that did not parse, skipped: {s['bad_lines']:,}")
        if s["contaminated_by"]:
            lines.append(f"- eval items matched: {', '.join(f'{k} ({v})' for k, v in s['contaminated_by'].items())}")
        lines.append(f"- {len(s['files'])} input files (sha256):")
        lines += [f"  - `{f['sha256']}` {f['path']}" for f in s["files"][:_MD_FILES]]
        if len(s["files"]) > _MD_FILES:
            lines.append(f"  - and {len(s['files']) - _MD_FILES:,} more, listed in datasheet.json")
    return "\n".join(lines) + "\n"


def plot_mixture(sheet: dict, path: Path) -> None:
    # A bare Figure draws with Agg and leaves pyplot's global backend and figure list alone.
    from matplotlib.figure import Figure

    names = [s["name"] for s in sheet["sources"]]
    fig = Figure(figsize=(6, 1.2 + 0.4 * len(names)))
    ax = fig.subplots()
    ax.barh(names[::-1], [100 * s["token_share"] for s in sheet["sources"]][::-1])
    ax.set_xlabel("share of tokens (%)")
    ax.set_title("corpus mixture")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version string in the file


def write_source_datasheet(folder: Path, manifest: dict, source: dict[str, str]) -> dict:
    """datasheet.json (and .md) for shards built straight from files of one known source rather than from a
    recipe: its name, licence and origin, and each input file's hash and counts, which `nomoat info` reads from
    every checkpoint trained on them. The demo writes one for the bundled Shakespeare."""
    files = manifest["inputs"] + manifest.get("val_inputs", [])
    sheet = {
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "sources": [
            {
                **source,
                "files": [{"path": f["path"], "sha256": f["sha256"], "bytes": f["bytes"]} for f in files],
                "documents_out": sum(f["documents"] for f in files),
                "bytes_out": sum(f["bytes"] for f in files),
                "tokens_out": sum(f["tokens"] for f in files),
            }
        ],
        "splits": {name: {k: s[k] for k in ("documents", "tokens", "bytes")} for name, s in manifest["splits"].items()},
    }
    (folder / "datasheet.json").write_text(json.dumps(sheet, indent=2, sort_keys=True) + "\n")
    md = [f"# Datasheet\n\n{source['name']}: {source['license']}, from {source['url']}.\n"]
    md += [f"- `{f['sha256']}` {f['path']} ({f['bytes']:,} bytes)" for f in sheet["sources"][0]["files"]]
    (folder / "datasheet.md").write_text("\n".join(md) + "\n")
    return sheet


def write_files_datasheet(folder: Path, files: list[Path], source: dict[str, str]) -> None:
    """datasheet.json beside ready-made training files (chats, preference pairs) that came from one known source:
    its name, licence and origin and each file's hash, so that a model fine-tuned on one of them records where
    its data came from and under which licence (`source_of`)."""
    entry = {**source, "files": [{"path": str(f), "sha256": file_sha256(f), "bytes": f.stat().st_size} for f in files]}
    write_text_atomic(folder / "datasheet.json", json.dumps({"sources": [entry]}, indent=2, sort_keys=True) + "\n")


def source_of(path: Path, sha256: str) -> dict[str, str | None] | None:
    """The name, licence and origin that a datasheet.json beside the file records for it (matched by hash, so a
    file changed since is not credited), or None."""
    sheet = path.parent / "datasheet.json"
    try:
        sources = json.loads(sheet.read_text()).get("sources", []) if sheet.is_file() else []
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable sheet records nothing; the data itself is checked when it is read
    for source in sources if isinstance(sources, list) else []:
        if any(isinstance(f, dict) and f.get("sha256") == sha256 for f in source.get("files", [])):
            return {k: source.get(k) for k in ("name", "license", "url")}
    return None
