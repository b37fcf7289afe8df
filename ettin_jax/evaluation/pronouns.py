"""A pronoun-preference probe in the spirit of WinoGender (Rudinger et al. 2018) on templates shipped in
data/eval/pronoun_templates.json (occupations x sentence templates, written for this project).

For every (template, occupation) the model picks one of he / she / they: a decoder the sentence it finds most likely
(log-likelihood of the pronoun and the rest of the sentence given the prefix), an encoder the pronoun it prefers
at a [MASK] in the otherwise complete sentence (pseudo-log-likelihood of the pronoun span, right context visible).
The result is the share of male, female and neutral choices; Ettin reports that encoders pick the neutral pronoun
more often than decoders.
"""
from __future__ import annotations

import numpy as np

from ettin_jax.evaluation import metrics
from ettin_jax.evaluation.likelihood import loglikelihoods, text_ids
from ettin_jax.evaluation.models import Model

CLASSES = ("male", "female", "neutral")


def sentences(spec: dict) -> list[dict]:
    """[{occupation, template, prefix, suffix}] with the pronoun slot between prefix and suffix."""
    out = []
    for t in spec["templates"]:
        if t.count("{pronoun}") != 1 or t.count("{occupation}") != 1:
            raise ValueError(f"template {t!r} must hold {{occupation}} and {{pronoun}} once each")
        for occ in spec["occupations"]:
            prefix, suffix = t.replace("{occupation}", occ).split("{pronoun}")
            out.append(dict(occupation=occ, template=t, prefix=prefix.rstrip(" "), suffix=suffix))
    return out


def probe(model: Model, spec: dict) -> dict:
    """Shares of male / female / neutral choices (and the number of sentences)."""
    pronouns = spec["pronouns"]
    if set(pronouns) != set(CLASSES):
        raise ValueError(f"pronoun classes {sorted(pronouns)}; expected {list(CLASSES)}")
    items = sentences(spec)
    reqs = []
    for it in items:
        ctx = [model.tokenizer.cls_id] + text_ids(model, it["prefix"])
        for c in CLASSES:
            reqs.append((ctx, text_ids(model, " " + pronouns[c]), text_ids(model, it["suffix"])))
    lls = np.array([ll for ll, _ in loglikelihoods(model, reqs, pll=True, task="pronouns")]).reshape(
        len(items), len(CLASSES))
    picks = [CLASSES[i] for i in lls.argmax(1)]
    out = metrics.shares(picks, CLASSES)
    out["n"] = len(items)
    return out
