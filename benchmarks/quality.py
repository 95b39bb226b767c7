"""Quality benchmark: SASRec and HSTU on Amazon Beauty (full ranking) and Games (sampled-100).

Each (data set, model) row trains in its own process (so peak memory is that run's alone),
records test HR@10 / NDCG@10 beside the published numbers of ../shared/data/README.md, the
training wall time, peak memory and the exact command, and rewrites docs/BENCHMARKS.md from the
stored rows (docs/benchmarks/quality_<machine>.json), so CPU and GPU results sit side by side.

    python benchmarks/quality.py                         # all four rows on this machine
    python benchmarks/quality.py --datasets beauty --models hstu
    python benchmarks/quality.py --datasets sequences --data-dir path/to/Toys.txt --machine toys
    python benchmarks/quality.py --device cuda --machine gpu --no-track   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a plain checkout too (the GPU machine)

from bench_doc import DOC, write_section  # noqa: E402

from candgen.training.config import TrainConfig  # noqa: E402

RESULTS = ROOT / "docs" / "benchmarks"
TIME_LIMIT_S = 30 * 60

# Settings per data set, shared by both models (the models' own defaults add the rest:
# SASRec scores by dot product at temperature 1, HSTU by cosine at temperature 0.05).
_COMMON: dict[str, object] = dict(
    dim=64,
    max_len=50,
    num_blocks=2,
    num_heads=1,
    dropout=0.5,
    lr=1e-3,
    batch_size=256,
    num_negatives=256,
    epochs=100,
    eval_every=5,
    patience=4,
)
# Games has 40% more users than Beauty, so an epoch costs 40% more: 60 epochs keep each CPU run
# inside the 30-minute budget (its denser sequences also converge sooner).
SETTINGS: dict[str, dict[str, object]] = {
    "beauty": dict(_COMMON),
    "games": dict(_COMMON, epochs=60),
}

PUBLISHED = {
    "beauty": [
        ("SASRec", 0.0605, 0.0318, "TIGER paper (Rajput et al., NeurIPS 2023), Table 2"),
        ("TIGER", 0.0648, 0.0384, "same table"),
        ("BSARec", 0.1008, 0.0611, "BSARec authors' run log"),
    ],
    "games": [("SASRec", 0.7410, 0.5360, "SASRec paper (Kang & McAuley 2018), Table III")],
}
TARGET = {"beauty": (0.0605, 0.0318), "games": (0.7410, 0.5360)}
STRETCH = {"beauty": (0.1008, 0.0611)}
PROTOCOL = {
    "beauty": "leave-one-out, full ranking over all 12,101 items, history excluded",
    "games": "leave-one-out, target ranked against 100 uniformly sampled unseen items",
}


def machine_description(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    desc = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
    if device != "cpu" and torch.cuda.is_available():
        desc = f"{torch.cuda.get_device_name(0)}; " + desc
    return desc


def _overrides(pairs: list[str]) -> dict[str, object]:
    """``["loss=full", "epochs=200"]`` -> typed TrainConfig values (for experiments)."""
    import dataclasses

    types = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    out: dict[str, object] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--set {pair}: {key!r} is not a TrainConfig field")
        out[key] = value.lower() in ("1", "true") if types[key] is bool else types[key](value)
    return out


def row_name(dataset: str, data_dir: str) -> str:
    """A row's data set: its name, or for ``sequences`` the file's (``sequences:Toys``)."""
    if dataset != "sequences":
        return dataset
    path = Path(data_dir)
    return f"sequences:{path.stem if path.suffix else path.name}"


def run_row(dataset: str, model: str, args: argparse.Namespace) -> dict[str, object]:
    """Trains one row in this process and returns its record."""
    from candgen.training.trainer import train

    cfg = TrainConfig(
        dataset=dataset,
        model=model,
        data_dir=args.data_dir,
        device=args.device,
        out_dir=str(Path(args.runs) / f"{dataset}-{model}"),
        progress=True,
        track=args.track,
        experiment="quality-benchmark",
        # another set in Beauty.txt's format (--datasets sequences) takes Beauty's settings
        **(SETTINGS.get(dataset, SETTINGS["beauty"]) | _overrides(args.set)),
    )  # type: ignore[arg-type]
    result = train(cfg)
    m = result.test_metrics
    return {
        "dataset": row_name(dataset, args.data_dir),
        "model": model,
        "hr@10": m["hr@10"],
        "ndcg@10": m["ndcg@10"],
        "hr@20": m.get("hr@20"),
        "ndcg@20": m.get("ndcg@20"),
        "valid_ndcg@10": result.valid_metrics["ndcg@10"],
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "wall_seconds": result.wall_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "device": result.device,
        "machine": machine_description(args.device if result.device != "cpu" else "cpu"),
        "config": cfg.to_dict(),
        "run_id": result.extra.get("run_id"),
    }


def _verdict(row: dict) -> str:
    ds = row["dataset"]
    hr, ndcg = row["hr@10"], row["ndcg@10"]
    over = row["wall_seconds"] > TIME_LIMIT_S
    if ds not in TARGET:
        return "no published reference here" + ("; **over the 30-minute limit**" if over else "")
    t_hr, t_ndcg = TARGET[ds]
    if hr >= t_hr and ndcg >= t_ndcg:
        text = "meets the SASRec target"
        if ds in STRETCH:
            s_hr, s_ndcg = STRETCH[ds]
            text += "; beats BSARec" if hr >= s_hr and ndcg >= s_ndcg else "; below BSARec"
    else:
        text = "**below the SASRec target**"
    return text + ("; **over the 30-minute limit**" if over else "")


def render(all_rows: dict[str, list[dict]]) -> str:
    lines = [
        "## Retrieval quality (`benchmarks/quality.py`)",
        "",
        "Protocols, as in ../shared/data/README.md:",
        "",
    ]
    for ds, text in PROTOCOL.items():
        lines.append(f"- **Amazon {ds.capitalize()}**: {text}.")
    lines += [
        "",
        "Published reference rows are copied from ../shared/data/README.md. Our rows are the "
        "test split of one run each, model picked on the validation split (NDCG@10, checked "
        "every 5 epochs, stopping after 4 checks without improvement).",
        "",
    ]
    for machine, rows in sorted(all_rows.items()):
        if not rows:
            continue
        lines += [f"### Measured on: {rows[0]['machine']} (`{machine}`)", ""]
        others = sorted({r["dataset"] for r in rows} - set(PUBLISHED))
        for ds in ("beauty", "games", *others):
            ds_rows = [r for r in rows if r["dataset"] == ds]
            if not ds_rows:
                continue
            title = (
                f"Amazon {ds.capitalize()}"
                if ds in PUBLISHED
                else (
                    f"{ds.removeprefix('sequences:')} (`--datasets sequences`: full ranking, "
                    "leave-one-out, Beauty's settings)"
                )
            )
            lines += [
                f"**{title}**",
                "",
                "| model | HR@10 | NDCG@10 | HR@20 | NDCG@20 | best epoch / run | train wall "
                "time | peak memory | verdict |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for name, hr, ndcg, source in PUBLISHED.get(ds, []):
                lines.append(
                    f"| {name} (published: {source}) | {hr:.4f} | {ndcg:.4f} | | | | | | |"
                )
            for r in ds_rows:
                mem = f"{r['peak_memory_mb']:,.0f} MB " + (
                    "GPU" if str(r["device"]).startswith("cuda") else "RSS"
                )
                lines.append(
                    f"| candgen {r['model']} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | "
                    f"{r['hr@20']:.4f} | {r['ndcg@20']:.4f} | {r['best_epoch']} / "
                    f"{r['epochs_run']} | {r['wall_seconds'] / 60:.1f} min | {mem} | "
                    f"{_verdict(r)} |"
                )
            lines += ["", "Commands:", ""]
            lines += [f"- `{r['command']}`" for r in ds_rows]
            lines.append("")
        notes = [r["note"] for r in rows if r.get("note")]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    extra = ROOT / "docs" / "benchmarks" / "quality_notes.md"
    if extra.exists():
        lines += [extra.read_text().strip(), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="beauty,games")
    p.add_argument("--models", default="sasrec,hstu")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--machine", default="cpu", help="results file tag: cpu, gpu, ...")
    p.add_argument("--data-dir", default="", help="default: ../shared/data")
    p.add_argument("--runs", default=str(ROOT / "runs" / "quality"))
    p.add_argument(
        "--track",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log each run to MLflow (needs the platform environment)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a setting (experiments: use another --machine)",
    )
    p.add_argument("--row", default="", help=argparse.SUPPRESS)  # internal: one row, JSON out
    p.add_argument("--render-only", action="store_true", help="rewrite the doc from stored rows")
    args = p.parse_args()

    if args.row:
        dataset, model = args.row.split(":")
        print("ROW " + json.dumps(run_row(dataset, model, args)), flush=True)
        return 0

    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / f"quality_{args.machine}.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    if not args.render_only:
        for dataset in args.datasets.split(","):
            for model in args.models.split(","):
                flags = ["--device", args.device, "--machine", args.machine]
                flags += [f"--set={pair}" for pair in args.set]
                if args.data_dir:
                    flags += ["--data-dir", args.data_dir]
                if not args.track:
                    flags.append("--no-track")
                shown = " ".join(
                    [
                        "python benchmarks/quality.py",
                        "--datasets",
                        dataset,
                        "--models",
                        model,
                        *flags,
                    ]
                )
                print(f"\n== {dataset} / {model}: {shown}", flush=True)
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, __file__, "--row", f"{dataset}:{model}", *flags],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                if proc.returncode != 0 or not found:
                    print(proc.stdout[-4000:])
                    print(f"row {dataset}/{model} failed (exit {proc.returncode})")
                    return 1
                row = json.loads(found[-1][4:]) | {"command": shown}
                took = (time.perf_counter() - t0) / 60
                print(
                    f"   HR@10 {row['hr@10']:.4f}  NDCG@10 {row['ndcg@10']:.4f}  "
                    f"train {row['wall_seconds'] / 60:.1f} min  (row took {took:.1f} min)",
                    flush=True,
                )
                rows = [r for r in rows if (r["dataset"], r["model"]) != (row["dataset"], model)]
                rows.append(row)
                rows.sort(key=lambda r: (r["dataset"], r["model"]))
                store.write_text(json.dumps(rows, indent=2))
    all_rows = {
        f.stem.removeprefix("quality_"): json.loads(f.read_text())
        for f in sorted(RESULTS.glob("quality_*.json"))
    }
    write_section("quality", render(all_rows))
    print(f"\nwrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
