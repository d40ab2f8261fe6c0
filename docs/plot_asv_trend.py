"""Plot asv's recorded SmallBatchNorm.time_fastbn per commit from `asv publish`'s graph JSON.

Usage: python docs/plot_asv_trend.py REPO_ROOT OUT.png  (after asv run ... and asv publish)
"""
import glob, itertools, json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
root = sys.argv[1]
index = json.load(open(f"{root}/.asv/html/index.json"))
name = "bench_batchnorm.SmallBatchNorm.time_fastbn"
graph = glob.glob(f"{root}/.asv/html/graphs/arch-x86_64/**/{name}.json", recursive=True)[0]
points = json.load(open(graph))
params = [[p.strip("'") for p in ps] for ps in index["benchmarks"][name]["params"]]
combos = list(itertools.product(*params))
revs = [r for r, _ in points]
tags = {v: k for k, v in index.get("tags", {}).items()}
labels = [tags.get(r, index["revision_to_hash"][str(r)][:7]) for r in revs]
fig, ax = plt.subplots(figsize=(7, 4))
for j, combo in enumerate(combos):
    ys = [vals[j] * 1e6 if vals[j] is not None else None for _, vals in points]
    if all(y is None for y in ys):
        continue
    ax.plot(range(len(revs)), ys, marker="o", label=" ".join(combo))
ax.set_xticks(range(len(revs)), labels)
ax.set_yscale("log"); ax.set_ylabel("per call (us, log)"); ax.set_xlabel("commit (first-parent order)")
ax.set_title("asv SmallBatchNorm.time_fastbn, FASTBN_ASV_SMOKE=1 (2-core VM, loaded)")
ax.legend(fontsize=7, ncol=2); fig.tight_layout(); fig.savefig(sys.argv[2], dpi=90)
for (r, vals), lab in zip(points, labels):
    print(lab, " ".join(f"{v*1e6:.0f}" if v else "-" for v in vals))
