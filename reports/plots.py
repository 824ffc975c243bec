"""The results page's plots (PNG, matplotlib's Agg backend), drawn from the records alone.

:func:`draw_all` decides which plots the records support and, given a folder, draws them
there; the page shows each plot after the last record it was drawn from. Each PNG is small
(100 dpi, a few inches): the tests hold them under 200 KB.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DPI = 100
Plot = tuple[str, list[str], Callable[[Path], None]]  # alt text, record stems, draw(path)


def draw_all(records: dict[str, dict], img_dir: Path | None) -> dict[str, tuple[str, list]]:
    """File name -> (alt text, the record stems it draws from); writes them when asked."""
    found: dict[str, Plot] = {}
    by_kind: dict[str, list[str]] = {}
    for stem in sorted(records):
        by_kind.setdefault(records[stem]["benchmark"], []).append(stem)
    for stem in by_kind.get("quality", []):
        found[f"{stem}.png"] = _quality(stem, records[stem])
    for kind, plot in (("serve_latency", _serve_latency), ("index_types", _index_types),
                       ("sequence_candidates", _sequence_candidates),
                       ("train_throughput", _train_throughput)):
        if by_kind.get(kind):
            found[f"{kind}.png"] = plot({s: records[s] for s in by_kind[kind]})
    if img_dir is not None:
        img_dir.mkdir(parents=True, exist_ok=True)
        for file, (_, _, draw) in found.items():
            draw(img_dir / file)
    return {file: (alt, stems) for file, (alt, stems, _) in found.items()}


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(3.6 * ncols + 1.2, 3.2), dpi=DPI)
    return fig, axes


def _plain_log_ticks(ax) -> None:
    """Log axes labelled at the decades only (minor labels overlap on narrow plots)."""
    from matplotlib.ticker import NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def _quality(stem: str, record: dict) -> Plot:
    f = record["figures"]
    metrics = [m for m in ("HR@10", "NDCG@10") if m in f.get("summary", {})]

    def draw(path: Path) -> None:
        fig, ax = _figure()
        names = ["Towerline", *[b["model"] for b in f.get("baselines", [])]]
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            if i == 0:
                values = [f["summary"][m]["mean"] for m in metrics]
                errors = [f["summary"][m].get("std", 0) for m in metrics]
            else:
                values = [f["baselines"][i - 1]["test"].get(m, 0) for m in metrics]
                errors = None
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
            ax.bar(xs, values, width, yerr=errors, label=name, capsize=3)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylabel("test, masked")
        ax.set_title(f"{record.get('setting') or 'quality'}: Towerline against the peers",
                     fontsize=9)
        ax.legend(fontsize=7)
        _save(fig, path)

    return (f"Quality on {record.get('setting')}", [stem], draw)


def _serve_latency(records: dict[str, dict]) -> Plot:
    stem = max(records, key=lambda s: (records[s].get("setting") is None, records[s]["date"]))
    cells = [c for c in records[stem]["figures"]["runs"]["demo"] if c["ingress"] == "haproxy"]

    def draw(path: Path) -> None:
        fig, (lat, rps) = _figure(2)
        for cell in cells:
            conc = [int(c[1:]) for c in cell["recommend"]]
            tag = "batching" if cell["batching"] else "no batching"
            for key, style, label in (("recommend", "-o", f"/recommend, {tag}"),
                                      ("floor", "--x", f"bare, {tag}")):
                lat.plot(conc, [v["p50_ms"] for v in cell[key].values()], style, label=label)
                rps.plot(conc, [v["rps"] for v in cell[key].values()], style, label=label)
        ticks = sorted({int(c[1:]) for cell in cells for c in cell["recommend"]})
        for ax, label in ((lat, "p50 ms"), (rps, "req/s")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
        lat.set_title("HAProxy ingress, demo run", fontsize=9)
        lat.legend(fontsize=6)
        _save(fig, path)

    return ("/recommend latency and throughput against concurrency, beside the bare "
            "deployment", list(records), draw)


def _index_types(records: dict[str, dict]) -> Plot:
    def draw(path: Path) -> None:
        fig, ax = _figure()
        markers = "os^D"
        for i, stem in enumerate(sorted(records, key=lambda s: records[s]["figures"]["items"])):
            f = records[stem]["figures"]
            for name, x in f["indexes"].items():
                ax.scatter(x["batch_qps"], x["recall_at_100"], marker=markers[i % 4])
                ax.annotate(f"{name} ({f['items']:,})", (x["batch_qps"], x["recall_at_100"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        _plain_log_ticks(ax)
        ax.set_xlabel("queries/s, batches of 1,000")
        ax.set_ylabel("recall@100 against exact")
        ax.set_title("Index types: recall against speed", fontsize=9)
        _save(fig, path)

    return ("Each index type's recall@100 against its query speed", list(records), draw)


def _sequence_candidates(records: dict[str, dict]) -> Plot:
    stem = max(records, key=lambda s: records[s]["date"])
    rows = records[stem]["figures"]["rows"]

    def draw(path: Path) -> None:
        fig, ax = _figure()
        items = [r["items"] for r in rows]
        for side in ("full", "sampled"):
            ax.plot(items, [1000 * r[side]["step_s"] for r in rows], "-o", label=side)
        ax.set_xscale("log")
        _plain_log_ticks(ax)
        ax.set_xticks(items, [f"{i:,}" for i in items])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("catalogue items")
        ax.set_ylabel("ms per training step")
        ax.set_title("Full against sampled softmax", fontsize=9)
        ax.legend(fontsize=7)
        _save(fig, path)

    return ("Training step time against catalogue size, full and sampled softmax", [stem],
            draw)


def _train_throughput(records: dict[str, dict]) -> Plot:
    def draw(path: Path) -> None:
        fig, (speed, memory) = _figure(2)
        labels, rates, peaks = [], [], []
        for stem in sorted(records):
            f = records[stem]["figures"]
            for side in ("plain", "ray_1_worker", "ray_2_workers"):
                if side in f:
                    labels.append(f"{records[stem].get('setting')}\n{side}")
                    rates.append(f[side]["samples_per_s"])
                    peaks.append(f[side]["peak_rss_mib"])
        speed.barh(labels, rates)
        memory.barh(labels, peaks)
        speed.set_xlabel("samples/s")
        memory.set_xlabel("peak RSS MiB (process tree)")
        memory.set_yticks([])
        speed.tick_params(labelsize=6)
        speed.set_title("Training: one process against Ray Train", fontsize=9)
        _save(fig, path)

    return ("Training samples/s and peak memory, one process against Ray Train",
            list(records), draw)
