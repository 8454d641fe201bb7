"""How should a specialist start? ``--init exact`` vs ``--init fitted-row`` (issue 17, item 5).

On the many-class benchmark's generalists (``bench/bench_many_class.py`` trains them), for
each seed and generalist size: specialists for the true groups (the 10 shapes), the same
recipe as the benchmark (40 epochs, lr 0.05), every specialist kept (``--keep-unhelpful``,
so both starts are compared specialist by specialist), once per start:

* ``exact``: the generalist restricted to its group (dustbin logit = log-sum-exp of the
  other classes' logits), equal to it at step 0;
* ``fitted-row``: the generalist's architecture with |S| + 1 outputs and a linear dustbin
  row fitted to that log-sum-exp (the start before issue 17).

Reported: the start's error (largest |log p - log p_folded| on 4,096 training examples), the
validation loss after the first epoch, the final validation NLL and in-group test accuracy
of the specialists (means over the 10), the combination's test accuracy and NLL, and a
student of the generalist's size distilled from the combination (T=4, alpha=0.1, the
generalist's recipe, as in ``bench/bench_many_class.py``): what the start does to the
teacher kdens exists to distill.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_specialist_init.py --runs runs/many-class \\
        --seeds 0,1,2 --out bench/results/specialist-init
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import many_class  # noqa: E402
from bench_many_class import GEN, GEN_RECIPE, KD, SPEC_RECIPE, Runner  # noqa: E402

INITS = ("exact", "fitted-row")


def measure(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    specs = [json.loads((run / s["run"] / "metrics.json").read_text()) for s in m["specialists"]]
    hist = [json.loads((run / s["run"] / "history.json").read_text()) for s in m["specialists"]]
    return {"combined_accuracy": m["combined"]["test_accuracy"], "combined_nll": m["combined"]["test_nll"],
            "generalist_accuracy": m["generalist"]["test_accuracy"],
            "init_error": float(np.mean([s["init_max_abs_logprob_diff"] for s in specs])),
            "epoch1_val_loss": float(np.mean([h[0]["val_loss"] for h in hist])),
            "val_nll": [s["val_nll"] for s in specs], "val_generalist_nll": [s["val_generalist_nll"] for s in specs],
            "in_group_accuracy": [s["test_in_group_accuracy"] for s in specs]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/many-class"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--generalists", default="g16,g32")
    ap.add_argument("--out", default="bench/results/specialist-init")
    args = ap.parse_args(argv)
    out = Path(args.out)
    r = Runner(out.with_suffix(".log"))
    res: dict = {}
    for g in args.generalists.split(","):
        for s in (int(x) for x in args.seeds.split(",")):
            for init in INITS:
                run = args.runs / "init-cmp" / f"s{s}-{g}-{init}"
                r.kdens(run, "train-specialists", "--generalist", args.runs / f"s{s}" / g, "--groups",
                        many_class.true_groups(), "--init", init, "--keep-unhelpful", "--seed", s, *SPEC_RECIPE)
                res[f"{g}/s{s}/{init}"] = measure(run)
                st = r.kdens(run.with_name(run.name + "-student"), "distill", "--teacher", run, "--model", "mlp",
                             "--model-arg", f"hidden={GEN[g]}", "--temperature", KD["temperature"], "--alpha",
                             KD["alpha"], "--seed", s, *GEN_RECIPE)
                res[f"{g}/s{s}/{init}"]["student_accuracy"] = st["test_accuracy"]
    lines = ["| generalist | seed | start | start error (nats) | val loss after epoch 1 | final val NLL | "
             "lower val NLL than the other start | in-group test accuracy | combined test accuracy | combined NLL | "
             "student (1x) accuracy |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, x in res.items():
        g, s, init = key.split("/")
        other = res[f"{g}/{s}/{INITS[1 - INITS.index(init)]}"]
        wins = sum(a < b for a, b in zip(x["val_nll"], other["val_nll"]))
        lines.append(f"| MLP-{g[1:]} | {s[1:]} | {init} | {x['init_error']:.3g} | {x['epoch1_val_loss']:.4f} | "
                     f"{np.mean(x['val_nll']):.4f} | {wins}/{len(x['val_nll'])} | "
                     f"{100 * np.mean(x['in_group_accuracy']):.2f} | {100 * x['combined_accuracy']:.2f} | "
                     f"{x['combined_nll']:.4f} | {100 * x['student_accuracy']:.2f} |")
    md = "\n".join(lines) + "\n"
    out.with_suffix(".json").write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                                                    "kdens_commands": r.commands, "results": res}, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
