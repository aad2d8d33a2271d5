"""The noise report as a picture: survival heatmap (module x expert) and cosine vs delta size in steps."""

import numpy as np

from reqnoise import atomic


def plot_noise(report: dict, path, overwrite: bool = False) -> None:
    """Write a PNG: left, delta cosine per (module, expert); right, cosine against RMS(dW)/step with the
    binned median survival curve. ``report`` is what ``noise_report`` returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["modules"]
    modules = sorted({r["module"] for r in rows}, key=lambda m: (rows[0]["layer"] is None, m))
    n_exp = max([(r["expert"] or 0) + 1 for r in rows] or [1])
    grid = np.full((len(modules), n_exp), np.nan)
    index = {m: i for i, m in enumerate(modules)}
    for r in rows:
        if r["delta_cosine"] is not None:
            grid[index[r["module"]], r["expert"] or 0] = r["delta_cosine"]

    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, max(4.0, 0.28 * len(modules) + 1.5)), gridspec_kw={"width_ratios": [1.4, 1]}
    )
    im = ax1.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=-0.2, vmax=1.0, interpolation="nearest")
    ax1.set_yticks(range(len(modules)))
    ax1.set_yticklabels([m.replace("model.layers.", "L") for m in modules], fontsize=7)
    ax1.set_xlabel("expert (dense modules: column 0)")
    ax1.set_title("cosine(effective delta, intended delta)")
    fig.colorbar(im, ax=ax1, fraction=0.04)

    pts = [
        (r["delta_rms_over_step"], r["delta_cosine"])
        for r in rows
        if r["delta_cosine"] is not None and r["delta_rms_over_step"]
    ]
    if pts:
        x, y = np.array(pts).T
        ax2.scatter(x, y, s=8, alpha=0.5)
        bins = np.logspace(np.log10(x.min()), np.log10(x.max()) + 1e-9, 12)
        centers, medians = [], []
        for lo, hi in zip(bins[:-1], bins[1:]):
            sel = (x >= lo) & (x <= hi)
            if sel.any():
                centers.append(np.sqrt(lo * hi))
                medians.append(np.median(y[sel]))
        ax2.plot(centers, medians, "k-", lw=2, label="median (survival curve)")
        ax2.set_xscale("log")
        ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax2.axvline(0.5, color="grey", ls=":", label="half a step")
        ax2.legend(loc="lower right", fontsize=8)
    ax2.set_xlabel("RMS(intended delta) / mean |scale|  (quantization steps)")
    ax2.set_ylabel("delta cosine")
    ax2.set_ylim(-0.25, 1.05)
    ax2.set_title("does the delta survive? (by its size)")
    fig.suptitle(report["verdict"], fontsize=9)
    fig.tight_layout()
    with atomic.atomic_file(path, overwrite=overwrite, mode="wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
