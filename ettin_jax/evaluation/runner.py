"""Evaluate several models on several tasks; a side-by-side table and its JSON form.

    results = evaluate_paths(["runs/demo", "runs/cross"], ["all"], pll=True)
    print(format_table(results))

`results` is {"models": {name: {arch, path, params}}, "scores": {name: {task: {metric: value}}}}.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

from ettin_jax.evaluation import tasks as tasks_lib
from ettin_jax.evaluation.models import load_models


def evaluate_paths(paths: Sequence[str], task_names: Sequence[str], *, which: Optional[str] = None,
                   names: Optional[Sequence[str]] = None, log=print, **kw) -> dict:
    """Every model at each path (both of a paired workdir) on every task. Task names and GLUE data are checked
    first, so an unknown task or unreadable GLUE data fails before any model is loaded."""
    task_names = tasks_lib.resolve(task_names)
    for t in task_names:
        if t.startswith("glue/"):
            tasks_lib.check_glue(t.split("/", 1)[1], kw.get("glue_dir"))
    out = dict(models={}, scores={}, seconds={})
    for i, path in enumerate(paths):
        for model in load_models(path, which=which, name=names[i] if names else None):
            out["models"][model.name] = dict(arch=model.arch, path=path, params=model.num_params)
            out["scores"][model.name] = {}
            for t in task_names:
                start = time.time()
                log(f"{model.name}: {t} ...")
                out["scores"][model.name][t] = tasks_lib.run(t, model, log=log, **kw)
                out["seconds"][f"{model.name}/{t}"] = round(time.time() - start, 1)
                log(f"{model.name}: {t} {out['scores'][model.name][t]} ({out['seconds'][f'{model.name}/{t}']} s)")
    return out


def format_table(results: dict, fmt: str = "text") -> str:
    """Rows task/metric, one column per model; fmt 'text' (aligned) or 'markdown'."""
    models = list(results["scores"])
    rows = []
    seen = []
    for m in models:
        for t, metrics in results["scores"][m].items():
            for k in metrics:
                if (t, k) not in seen:
                    seen.append((t, k))
    for t, k in seen:
        cells = []
        for m in models:
            v = results["scores"][m].get(t, {}).get(k)
            cells.append("-" if v is None else (str(v) if isinstance(v, int) else f"{v:.4f}"))
        rows.append([f"{t}/{k}"] + cells)
    header = ["task/metric"] + models
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in rows])
