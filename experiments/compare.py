"""(iii) The comparison report: evaluate every model of the given workdirs on the bundled tasks and write
report.md, results.json and PNG plots (the pairs' loss curves on shared axes; downstream scores by size and
architecture, as the paper's encoder-vs-decoder figure).

    python experiments/compare.py --out=experiments/results/demo /tmp/evaldemo /tmp/evaldemo-cross

Workdirs are read for their config (size, phase) and metrics.jsonl; a paired pretraining workdir gives the pair
(encoder, decoder), a paired `cross` workdir the two cross-objective models (encoder-from-decoder,
decoder-from-encoder). Encoders are scored on the likelihood tasks by masked pseudo-log-likelihood. The report then
says, per size, whether the direction of Ettin's finding holds on these tasks: encoder ahead on classification and
retrieval, decoder ahead on generation (the likelihood tasks), and whether the cross-objective models close the gap.
A difference smaller than two standard errors is called a tie, not a win.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ettin_jax.evaluation import classification, retrieval, runner, tasks  # noqa: E402

GEN_TASKS = ("austen_cloze", "stdlib_nextline")
ROLE = {("pretrain", "encoder"): "encoder", ("pretrain", "decoder"): "decoder",
        ("cross", "encoder"): "encoder-from-decoder", ("cross", "decoder"): "decoder-from-encoder"}


def read_run(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    metrics = []
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    return config, metrics


def stderr(p, n):
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def say(c):
    return "a **tie** (within 2 standard errors)" if c == "tie" else f"**{c}**"


def compare(a, b, n):
    """'ahead' / 'behind' / 'tie' for score a vs b (accuracy-like, n items; tie within 2 standard errors)."""
    se = math.sqrt(stderr(a, n) ** 2 + stderr(b, n) ** 2)
    if abs(a - b) <= 2 * se:
        return "tie"
    return "ahead" if a > b else "behind"


def plot_losses(runs, workdirs, path):
    """Loss vs tokens; a continuation (init_from one of the other workdirs) starts where its source ended."""
    fig, ax = plt.subplots(figsize=(7, 4))
    end = {os.path.abspath(w): (runs[label][1][-1]["step"] * runs[label][0]["global_batch_size"]
                                * runs[label][0]["seq_len"] if runs[label][1] else 0)
           for label, w in workdirs.items()}
    for label, (config, metrics) in runs.items():
        tokens_per_step = config["global_batch_size"] * config["seq_len"]
        offset = end.get(os.path.abspath(config.get("init_from") or "/nonexistent"), 0)
        for arch, style in (("encoder", "-"), ("decoder", "--")):
            pts = [(offset + m["step"] * tokens_per_step, m[f"{arch}/loss"]) for m in metrics
                   if f"{arch}/loss" in m]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{label} {arch} ({'MLM' if arch == 'encoder' else 'CLM'})")
    ax.set_xlabel("tokens seen (per model; cross-objective runs continue from their source)")
    ax.set_ylabel("training loss (nats)")
    ax.set_title("The pair's training losses on shared axes")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def final_loss(runs, name):
    label, arch = name.split(":")
    losses = [m[f"{arch}/loss"] for m in runs[label][1] if f"{arch}/loss" in m]
    return losses[-1] if losses else float("nan")


def headline(scores):
    """(name, value) of each task's headline metric."""
    out = {}
    if "austen_novel" in scores:
        out["classification: austen_novel accuracy"] = scores["austen_novel"]["accuracy"]
    if "stdlib_docstring" in scores:
        out["retrieval: stdlib_docstring nDCG@10"] = scores["stdlib_docstring"]["ndcg@10"]
    for t in GEN_TASKS:
        if t in scores:
            out[f"generation: {t} acc"] = scores[t]["acc"]
    if "pronouns" in scores:
        out["pronouns: neutral share"] = scores["pronouns"]["neutral"]
    return out


def plot_scores(rows, path):
    """One panel per headline metric: score vs parameters, one line per role."""
    metrics = sorted({k for r in rows for k in r["headline"]})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    styles = {"encoder": ("tab:blue", "o-"), "decoder": ("tab:red", "s-"),
              "encoder-from-decoder": ("tab:cyan", "^--"), "decoder-from-encoder": ("tab:orange", "v--")}
    for ax, metric in zip(axes[0], metrics):
        for role, (color, style) in styles.items():
            pts = sorted((r["params"] / 1e6, r["headline"][metric]) for r in rows
                         if r["role"] == role and metric in r["headline"])
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=role)
        ax.set_title(metric, fontsize=8)
        ax.set_xlabel("parameters (M)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Downstream scores by size and architecture", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def n_items(scores, task):
    """How many items a task's score is a mean over: the evaluation's own `n`, or (caches written before it was
    recorded) the size of the bundled data it was scored on."""
    if "n" in scores:
        return scores["n"]
    if task == "austen_novel":
        return len(tasks.read_jsonl("austen_novel_test.jsonl"))
    if task == "stdlib_docstring":
        return len({r["query_id"] for r in tasks.read_jsonl("stdlib_docstring_qrels.jsonl")})
    raise ValueError(f"scores of {task!r} carry no item count `n`: {sorted(scores)}")


def verdict(rows, results):
    """Markdown lines and, per size, whether the paper's finding holds: the encoder ahead on classification and
    retrieval (nDCG@10, the headline), the decoder ahead on generation, and (where the cross-objective models were
    evaluated) each cross-objective model still behind the model trained with that objective from the start."""
    lines = []
    sizes = sorted({r["size"] for r in rows})
    overall = []
    for size in sizes:
        by_role = {r["role"]: r for r in rows if r["size"] == size}
        enc, dec = by_role.get("encoder"), by_role.get("decoder")
        if not (enc and dec):
            continue
        s_enc, s_dec = results["scores"][enc["name"]], results["scores"][dec["name"]]
        lines.append(f"**Size {size}{' (configs/demo.py)' if size == 'tiny' else ''}** ({enc['params'] / 1e6:.2f}M parameters per model):")
        checks, cross = [], []
        if "austen_novel" in s_enc:
            n = n_items(s_enc["austen_novel"], "austen_novel")
            a, b = s_enc["austen_novel"]["accuracy"], s_dec["austen_novel"]["accuracy"]
            c = compare(a, b, n)
            checks.append(c == "ahead")
            lines.append(f"- classification (austen_novel accuracy, n={n}): encoder {a:.3f} vs decoder {b:.3f}: "
                         f"the encoder is {say(c)} (paper: ahead); majority class {s_enc['austen_novel']['majority']:.3f}")
        if "stdlib_docstring" in s_enc:
            n = n_items(s_enc["stdlib_docstring"], "stdlib_docstring")
            a, b = s_enc["stdlib_docstring"]["ndcg@10"], s_dec["stdlib_docstring"]["ndcg@10"]
            ma, mb = s_enc["stdlib_docstring"]["mrr@10"], s_dec["stdlib_docstring"]["mrr@10"]
            c = compare(a, b, n)  # nDCG@10 is a mean of per-query values in [0, 1]; the binomial SE bounds it
            checks.append(c == "ahead")
            lines.append(f"- retrieval (stdlib_docstring after contrastive fine-tuning, {n} queries): nDCG@10 "
                         f"encoder {a:.3f} vs decoder {b:.3f}: the encoder is {say(c)} (paper: ahead); MRR@10 "
                         f"{ma:.3f} vs {mb:.3f}")
        for t in GEN_TASKS:
            if t in s_enc:
                a, b = s_dec[t]["acc"], s_enc[t]["acc"]
                c = compare(a, b, s_dec[t]["n"])
                checks.append(c == "ahead")
                lines.append(f"- generation ({t} accuracy by likelihood, n={s_dec[t]['n']}, chance {s_dec[t]['chance']:.2f}): "
                             f"decoder {a:.3f} vs encoder (PLL) {b:.3f}: the decoder is {say(c)} (paper: ahead)")
        if "pronouns" in s_enc:
            a, b = s_enc["pronouns"]["neutral"], s_dec["pronouns"]["neutral"]
            lines.append(f"- pronouns: neutral share encoder {a:.3f} vs decoder {b:.3f} (paper: encoders choose the "
                         f"neutral pronoun more often): {'same direction' if a > b else 'not the same direction'}")
        for role, base, other, tasks_ in (("encoder-from-decoder", "encoder", "decoder", ("austen_novel",)),
                                          ("decoder-from-encoder", "decoder", "encoder", GEN_TASKS)):
            x = by_role.get(role)
            if not x:
                continue
            s_x, s_base = results["scores"][x["name"]], results["scores"][by_role[base]["name"]]
            s_other = results["scores"][by_role[other]["name"]]
            for t in tasks_:
                if t not in s_x or t not in s_base:
                    continue
                key = "accuracy" if t == "austen_novel" else "acc"
                n = n_items(s_x[t], t)
                xv, bv, ov = s_x[t][key], s_base[t][key], s_other[t][key]
                c = compare(xv, bv, n)
                cross.append(c == "behind")
                gap = compare(bv, ov, n)
                if c == "behind":
                    judged = "still **behind** it: the gap is not closed (as the paper)"
                else:
                    judged = ("level with it (within 2 standard errors)" if c == "tie" else "**ahead** of it") + (
                        ": the gap is closed (paper: not closed)" if gap == "ahead" else
                        f": there was no gap to close (the {base} is not ahead of the {other} here), so this does "
                        "not confirm the paper")
                lines.append(f"- cross-objective ({t} {key}, n={n}): {role} {xv:.3f} vs the {base} trained so from "
                             f"the start {bv:.3f} (and the {other} it started from {ov:.3f}): {judged}")
        if cross:
            kept = all(cross)
            lines.append(f"- cross-objective: the gap stays open in all {len(cross)} comparisons (as the paper)"
                         if kept else f"- cross-objective: the gap is closed or absent in {len(cross) - sum(cross)} "
                         f"of {len(cross)} comparisons (paper: it stays open)")
        holds = bool(checks) and all(checks) and all(cross)
        overall.append(holds if checks else None)
        lines.append(f"- **verdict at this size: the direction of the paper's finding "
                     f"{'holds' if holds else 'does NOT hold'}** on these tasks"
                     + ("" if holds else " (at least one comparison is a tie or goes the other way; see above)"))
        lines.append("")
    return lines, overall


def timing_note(seconds):
    """The evaluation time for the report: per model and task, wall-clock seconds (runner.evaluate_paths)."""
    return (f"Evaluation took {sum(seconds.values()) / 60:.1f} minutes of wall-clock time, summed over models and "
            "tasks (less elapsed where they ran as parallel processes).")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", required=True, help="folder for report.md, results.json and the plots")
    p.add_argument("--tasks", default="all")
    p.add_argument("--lrs", default="3e-4", help="classification learning-rate grid, comma-separated")
    p.add_argument("--epochs", type=float, default=8.0)
    p.add_argument("--max_len", type=int, default=128, help="classification fine-tuning length (tokens)")
    p.add_argument("--contrastive_steps", type=int, default=150)
    p.add_argument("--reuse", action="store_true", help="skip evaluations already in OUT/cache/")
    p.add_argument("--report_only", action="store_true", help="evaluate nothing: write the report from OUT/cache/")
    p.add_argument("--which", default=None, choices=["encoder", "decoder"], help="only this model of each workdir")
    p.add_argument("--eval_only", action="store_true", help="evaluate into OUT/cache/ and stop (for parallel runs)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each multiple-choice task")
    p.add_argument("--contrastive_lr", type=float, default=1e-4)
    p.add_argument("--query_len", type=int, default=64)
    p.add_argument("--doc_len", type=int, default=128, help="retrieval document / likelihood-task length")
    p.add_argument("--command", default=None, help="the command line to record in the report")
    p.add_argument("--note", default=None, help="a paragraph printed under the report's title")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    runs, names = {}, []
    for w in args.workdirs:  # every workdir ever evaluated into OUT/cache must be listed (for its config)
        config, metrics = read_run(w)
        label = f"{config.get('size')}-{config.get('phase')}"
        runs[label] = (config, metrics)
        names.append(label)
    contrastive = retrieval.ContrastiveConfig(steps=args.contrastive_steps, lr=args.contrastive_lr,
                                              query_len=args.query_len,
                                              doc_len=args.doc_len)
    cache_dir = os.path.join(args.out, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    for w, label in zip(args.workdirs, names):
        tag = f"{label}_{args.which or 'all'}_{args.tasks.replace(',', '+')}"
        if args.report_only or (args.reuse and os.path.exists(os.path.join(cache_dir, tag + ".json"))):
            continue
        part = runner.evaluate_paths(
            [w], args.tasks.split(","), names=[label], which=args.which, pll=True, limit=args.limit,
            finetune=classification.FinetuneConfig(lrs=tuple(float(x) for x in args.lrs.split(",")),
                                                   epochs=args.epochs, max_len=args.max_len),
            contrastive=contrastive, log=lambda m: print(m, file=sys.stderr, flush=True))
        with open(os.path.join(cache_dir, tag + ".json"), "w") as f:
            json.dump(part, f, indent=2)
    if args.eval_only:
        return
    # Every model and task evaluated into OUT/cache/ (this run or earlier ones, possibly in parallel processes).
    results = dict(models={}, scores={}, seconds={})
    for fname in sorted(os.listdir(cache_dir)):
        with open(os.path.join(cache_dir, fname)) as f:
            part = json.load(f)
        results["models"].update(part["models"])
        results["seconds"].update(part["seconds"])
        for name, scores in part["scores"].items():
            results["scores"].setdefault(name, {}).update(scores)
    results["scores"] = {m: results["scores"][m] for m in sorted(results["scores"])}
    results["settings"] = dict(epochs=args.epochs, max_len=args.max_len, lrs=args.lrs,
                               contrastive_steps=args.contrastive_steps, contrastive_lr=args.contrastive_lr,
                               query_len=args.query_len,
                               doc_len=args.doc_len, limit=args.limit)
    rows = []
    for name, info in results["models"].items():
        config = runs[name.split(":")[0]][0]
        rows.append(dict(name=name, size=config.get("size"), role=ROLE.get((config.get("phase"), info["arch"]),
                                                                           info["arch"]),
                         params=info["params"], headline=headline(results["scores"][name])))
    results["roles"] = {r["name"]: r["role"] for r in rows}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_losses(runs, dict(zip(names, args.workdirs)), os.path.join(args.out, "losses.png"))
    plot_scores(rows, os.path.join(args.out, "scores.png"))
    lines, overall = verdict(rows, results)
    minutes = (time.time() - start) / 60
    report = [
        "# Encoder vs decoder on the bundled tasks", "",
        *([f"**{args.note}**", ""] if args.note else []),
        "Made by:", "", "```", args.command or "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])), "```", "",
        f"{timing_note(results['seconds'])} Settings: {results['settings']}. Tasks and data: `data/eval/README.md`; protocol: "
        "`ettin_jax/evaluation/` (classification: fine-tuned, decoupled AdamW, 6% warmup + linear decay, mean "
        "pooling; retrieval: mean pooling, contrastive fine-tuning with in-batch negatives at scale 20, held-out "
        "stdlib; generation: zero-shot multiple choice by log-likelihood, encoders by masked pseudo-log-likelihood; "
        "pronouns: WinoGender-style templates).", "",
        "## Verdict: the direction of Ettin's finding", "",
        "Ettin: at equal size the encoder wins classification and retrieval, the decoder wins generation, and "
        "cross-objective continued training does not close the gap. Below, a difference within two standard "
        "errors is a **tie** and does not count as agreement; the verdict holds only if every comparison agrees, "
        "the cross-objective ones included where those models were evaluated.", "",
        *lines,
        "## Caveats", "",
        "- Final training losses are listed under Models: models this small and this briefly trained are far from "
        "Ettin's, and the bundled tasks are small (standard errors of several points), so a tie is the expected "
        "outcome of many comparisons; the direction, not the size, of a difference is what this report checks.",
        "- `austen_novel` and `austen_cloze` are built from Austen text that is also in the pretraining corpus "
        "(split by chapter from the fine-tuning data); the stdlib tasks use files held out from pretraining.",
        "- Encoders answer the likelihood tasks by masked pseudo-log-likelihood, which is not a probability of the "
        "text; Ettin likewise scores its encoders on generative tasks only through such workarounds.",
        "",
        "## Models", "",
        "| model | role | parameters | final training loss | workdir |", "|---|---|---|---|---|",
        *[f"| {r['name']} | {r['role']} | {r['params']:,} | {final_loss(runs, r['name']):.3f} | "
          f"`{results['models'][r['name']]['path']}` |" for r in rows],
        "", "## All scores", "", runner.format_table(results, "markdown"), "",
        "Chance level of the multiple-choice tasks is 0.25; `majority` is the always-majority-class accuracy of "
        "the classification task. `zero_shot_*` are retrieval scores of the pooled embeddings before fine-tuning.",
        "", "## Plots", "", "![losses](losses.png)", "", "![scores](scores.png)", "",
        "Seconds per model and task: " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()), "",
    ]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(report))
    print("\n".join(lines))
    print(f"wrote {args.out}/report.md, results.json, losses.png, scores.png ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
