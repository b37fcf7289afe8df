"""Starting a run from another: `config.init_from` (an ettin workdir or a Hugging Face folder) and `init_mode`.

    init_mode=full     phases 2 and 3: weights and optimizer state of the same architecture continue
    init_mode=weights  cross-objective (or a released checkpoint): weights only, a fresh optimizer; in a `cross`
                       phase each architecture starts from the *other* one's weights (encoder from decoder, ...)

`check_init_source` refuses a source trained with another vocabulary before any data is read; `load_initial` puts
the source's weights (and moments) onto this run's shardings.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp

from ettin_jax import checkpoint as ckpt_lib
from ettin_jax import recipe, sharding
from ettin_jax.errors import ConfigError
from ettin_jax.model import ModelConfig, abstract_params



def load_initial(config, models, fresh_params, tx, log, rules=sharding.DEFAULT_RULES):
    """Phase continuation: weights (+ optimizer for init_mode=full) from `init_from`, onto fresh shardings.

    Each architecture starts from the one `_source_arch` picks. With init_mode=full the optimizer state of exactly
    those architectures continues: a paired run's encoder state feeds an encoder-only extension, say.
    """
    src = config.init_from
    if _is_hf_folder(src):
        from ettin_jax import hf
        if config.init_mode == "full":
            raise ConfigError(f"init_from={src} is a Hugging Face folder, which has no optimizer state; "
                              "use --config.init_mode=weights")
        hf_params, hf_cfg, hf_arch = hf.load_hf_folder(src)
        source, ck = {hf_arch: hf_params}, None
    else:
        ck = ckpt_lib.Checkpoints(src, async_save=False)
        step, restored = ck.restore_latest(log=log)
        if restored is None:
            ck.close()
            raise ConfigError(f"init_from={src}: no readable checkpoint")
        source = restored["params"]
    take = {}
    for arch in models:
        from_arch = _source_arch(config, arch, source)
        if from_arch is None:
            raise ConfigError(f"init_from={src} holds {sorted(source)}; nothing to start the {arch} from")
        mismatch = _first_mismatch(fresh_params[arch], source[from_arch])
        if mismatch:
            raise ConfigError(f"init_from={src}: the {from_arch} does not fit the configured {arch} "
                              f"(size {config.size}): {mismatch}")
        take[arch] = from_arch
    params = {arch: jax.tree_util.tree_map(lambda x, ref: jax.device_put(jnp.asarray(x, ref.dtype), ref.sharding),
                                           source[from_arch], fresh_params[arch])
              for arch, from_arch in take.items()}
    for arch, from_arch in take.items():
        if from_arch != arch:
            log(f"cross-objective: the {arch} starts from the {from_arch}'s weights")
    source_opt = None
    if config.init_mode == "full":
        if not os.path.isdir(os.path.join(ck.directory, str(step), "opt_state")):
            ck.close()
            raise ConfigError(f"init_from={src}: checkpoint {step} has no optimizer state (an import?); "
                              "use --config.init_mode=weights")
        source_opt = _restore_opt_state(ck, step, src, source, fresh_params, tx, rules)
    if ck is not None:
        ck.close()
        log(f"initialising from {src} step {step} ({config.init_mode})")
    return params, source_opt


def _restore_opt_state(ck, step, src, source_params, fresh_params, tx, rules):
    """The optimizer state of this run's architectures from a checkpoint whose run may have trained more of them
    (a paired run): restored whole onto the mesh, each architecture's moments sharded like its parameters, then
    the leaves this run's state has are picked by their tree path (the same path: the same architecture)."""
    mesh = jax.tree_util.tree_leaves(fresh_params)[0].sharding.mesh
    source_models = ckpt_lib.load_models(src)
    abstract = {}
    for arch in source_params:
        if arch in fresh_params:
            abstract[arch] = sharding.abstract(fresh_params[arch])
        else:  # an architecture this run does not train: sharded by the rules, as its own run had it
            shapes, specs = abstract_params(source_models[arch])
            shards = sharding.fit_shardings(sharding.param_shardings(specs, mesh, rules), shapes)
            abstract[arch] = jax.tree_util.tree_map(
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shards)
    full = jax.eval_shape(tx.init, abstract)
    full = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                  full, sharding.like_params(full, abstract, mesh))
    restored = ck.restore(step, opt_state=full)["opt_state"]
    if set(source_params) == set(fresh_params):
        return restored
    by_path = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    target = jax.eval_shape(tx.init, fresh_params)
    return jax.tree_util.tree_map_with_path(lambda p, _: by_path[jax.tree_util.keystr(p)], target)


def _first_mismatch(expected, got) -> Optional[str]:
    """The first parameter whose shape differs (or a note that the trees differ), None when they fit."""
    if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(got):
        return "the parameter trees differ (other layers or names)"
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree_util.tree_leaves(got)):
        if tuple(a.shape) != tuple(b.shape):
            return f"{jax.tree_util.keystr(path)} has shape {tuple(b.shape)}, expected {tuple(a.shape)}"
    return None


def _source_arch(config, arch: str, available) -> Optional[str]:
    """Which architecture of a previous run `arch` starts from: the other one in a cross-objective run (the same
    one as a fallback); the same one in a phase continuation (the other one as a fallback for init_mode=weights)."""
    if config.phase == "cross":
        order = (recipe.cross_source(arch), arch)
    elif config.init_mode == "full":  # the optimizer state belongs to the architecture it was trained with
        order = (arch,)
    else:
        order = (arch, recipe.cross_source(arch))
    return next((a for a in order if a in available), None)


def _source_models(src: str) -> dict[str, ModelConfig]:
    """{architecture: ModelConfig} of init_from (an ettin workdir or a Hugging Face folder), without the weights."""
    if _is_hf_folder(src):
        from ettin_jax import hf
        with open(os.path.join(src, "config.json")) as f:
            cfg, arch = hf.model_config_from_hf(json.load(f), **hf._tokenizer_special_ids(src))
        return {arch: cfg}
    try:
        return ckpt_lib.load_models(src)
    except FileNotFoundError:
        raise ConfigError(f"init_from={src}: neither an ettin workdir (models.json) nor a Hugging Face folder "
                          "(config.json)") from None


def _is_hf_folder(src: str) -> bool:
    return os.path.exists(os.path.join(src, "config.json")) and not os.path.exists(os.path.join(src, "models.json"))


TOKEN_FIELDS = ("vocab_size", "pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id")


def check_init_source(config, models: dict[str, ModelConfig], tokenizer):
    """Refuses to start from init_from when this run's vocabulary differs from the source model's: its embedding
    rows would mean other tokens (a released Ettin model with the bundled 8192-token BPE, say). Names the fields
    and the tokenizer to use instead. Runs before any data is read or anything is compiled."""
    src = config.init_from
    source = _source_models(src)
    for arch, cfg in models.items():
        from_arch = _source_arch(config, arch, source)
        if from_arch is None:
            hint = (f"; init_mode=full continues the same architecture (with its optimizer state): use "
                    "--config.init_mode=weights or phase=cross to start from the other one"
                    if config.init_mode == "full" and config.phase != "cross" else "")
            raise ConfigError(f"init_from={src} holds {sorted(source)}; nothing to start the {arch} from{hint}")
        theirs = source[from_arch]
        differ = [f for f in TOKEN_FIELDS if getattr(theirs, f) != getattr(cfg, f)]
        if not differ:
            continue
        shown = ", ".join(f"{f} {getattr(theirs, f)} there but {getattr(cfg, f)} here" for f in differ)
        # `ettin import` and every training run keep the tokenizer in WORKDIR/tokenizer; an HF folder holds its own.
        tok_dir = src if _is_hf_folder(src) else os.path.join(src, "tokenizer")
        use = f"--config.data.tokenizer={tok_dir if os.path.isdir(tok_dir) else 'THE_TOKENIZER_IT_WAS_TRAINED_WITH'}"
        if theirs.vocab_size != cfg.vocab_size:
            use += f" --config.model.vocab_size={theirs.vocab_size}"
        raise ConfigError(f"init_from={src}: the {from_arch} there was trained with another vocabulary than this "
                          f"run's {arch} (tokenizer {tokenizer.path}, config.model.vocab_size): {shown}; train with "
                          f"the source's tokenizer and vocabulary size: {use}")
