"""Pictures of what the benchmark tables say (matplotlib, an optional extra: pip install pagellm[plot]).

    plot_throughput(report, path)   output tokens/s per engine, each bar labelled with its ratio to the first
    plot_serve(report, path)        TTFT and TPOT: the distribution (empirical CDF) of every request
    plot_kv(report, path)           KV utilization and running sequences per step, paged vs contiguous
"""

from __future__ import annotations


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install pagellm[plot]") from e
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(report: dict, path: str) -> None:
    plt = _plt()
    rows = report["results"]
    names = [r["engine"] for r in rows]
    rates = [r["output_tokens_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.6))
    bars = ax.bar(names, rates, color=["#3b82f6"] + ["#9ca3af"] * (len(rows) - 1))
    for bar, rate in zip(bars, rates):
        ax.annotate(f"{rate:.0f}\n({rates[0] / rate:.2f}x)" if rate != rates[0] else f"{rate:.0f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    w = report["workload"]
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{w['num_requests']} requests, {w['prompt_tokens']} + {w['output_tokens']} tokens; "
                 f"{report.get('device', 'cpu')}, {report.get('threads', '?')} threads", fontsize=9)
    ax.margins(y=0.2)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_serve(report: dict, path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], "tpot_s", "time per output token")):
        values = sorted(1000 * v for v in report["samples"][key])
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", color="#3b82f6")
            for q in (50, 99):
                ax.axvline(1000 * report[key]["p99" if q == 99 else "median"], ls="--", lw=0.8, color="#9ca3af")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} (median, p99 dashed)", fontsize=9)
    fig.suptitle(f"{report['completed']} requests, {report['output_token_throughput']:.0f} output tokens/s",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kv(report: dict, path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for run in report["runs"]:
        axes[0].plot([100 * u for u in run["utilization_series"]], label=run["name"], lw=1.2)
        axes[1].plot(run["running_series"], label=run["name"], lw=1.2)
    axes[0].set_ylabel("KV utilization %")
    axes[1].set_ylabel("sequences running")
    axes[1].set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"KV budget {report['kv_tokens']} token slots", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
