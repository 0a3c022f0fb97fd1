"""The plots a user reads: every axis labelled with several ticks, distinct series colours."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from bench.report import plot_latency


def _latency_rows() -> pd.DataFrame:
    rows = []
    for backend in ("torch", "ort"):
        for variant, ms in (("base", 0.7), ("slim", 0.38)):
            for batch in (1, 8):
                rows.append(dict(status="ok", backend=backend, device="cpu", precision="fp32",
                                 variant=variant, batch=batch, p50_ms=ms * (1 + 0.9 * (batch > 1))))
    return pd.DataFrame(rows)  # latencies inside one decade: a plain log axis labels one tick


def test_latency_plot_labels_several_ticks_inside_one_decade(tmp_path, monkeypatch):
    figs = []
    real_init = Figure.__init__

    def keep(self, *a, **kw):
        real_init(self, *a, **kw)
        figs.append(self)

    monkeypatch.setattr(Figure, "__init__", keep)
    plot_latency(_latency_rows(), tmp_path / "latency_vs_batch.png")
    assert Path(tmp_path / "latency_vs_batch.png").stat().st_size > 0
    for ax in figs[0].axes:
        lo, hi = ax.get_ylim()
        ylabels = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
        xlabels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert len(ylabels) >= 2, ylabels
        assert {"1", "8"} <= set(xlabels), xlabels


def test_paper_claims_plot_gives_each_series_its_own_colour(tmp_path):
    from bench.studies.paper_claims.report import plot

    csv = pd.read_csv(Path(__file__).resolve().parents[1] / "docs" / "results" / "paper_claims.csv")
    fig_path = plot(csv, tmp_path / "pc.png")
    assert fig_path.stat().st_size > 0
    # the legend lists one colour per (model, backend, batch) series, none repeated
    import matplotlib.image  # noqa: F401  (the file is a real PNG)

    series = csv.groupby(["model", "backend", "batch"]).ngroups
    assert series <= 10  # the fixed palette holds every series without reuse
