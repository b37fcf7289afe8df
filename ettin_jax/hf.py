"""Conversion to and from Hugging Face transformers (ModernBertForMaskedLM / ModernBertDecoderForCausalLM).

Our parameter names follow the Hugging Face modules, so conversion is a table: for each of our leaves, the HF
tensor name, and whether the [in, out] kernel is transposed to torch's [out, in]. The encoder stores attention as
one fused Wqkv, the HF decoder as separate q/k/v projections: those are split on export and concatenated on import
(both exact). The decoder weight is tied to the token embedding and not written separately.

Continuing an imported decoder is not bit-for-bit what continuing it in transformers would be: ettin keeps the fused
Wqkv (as Ettin trained both models) and StableAdamW clips its learning rate per tensor, so HF + optimi's StableAdamW
with q/k/v as three tensors takes different steps (measured over 30 steps: v_proj ~1.7e-2 apart, losses equal to
2e-6). `ettin import` of a decoder prints this (`FUSED_QKV_NOTE`).

An export is meant to work with no glue: the tokenizer is written for the architecture (the encoder's wraps a text
as [CLS] ... [SEP]; the decoder's only starts it with [CLS], its BOS, so prompts are continued, not ended), with
BOS/EOS/pad/cls/sep/mask declared; a decoder gets generation_config.json (greedy, EOS [SEP]) so the text-generation
pipeline and lm-evaluation-harness's `hf` model read it as `ettin generate` and our adapter do; an encoder gets the
sentence-transformers files (the pooling our evaluation uses); every folder gets a model card (README.md) with its
provenance (`workdir_provenance`).

Import never assumes architecture values: rope thetas, layer types and window widths come from config.json,
under the current field names (`rope_parameters`, `layer_types`) or the older ones (`global_rope_theta`,
`local_rope_theta`, `global_attn_every_n_layers`). Any mismatch (missing tensor, wrong shape, unknown model_type,
heads not dividing the hidden size) is a one-line `ConversionError` naming the tensor or field, what was found and
what was expected.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from typing import Optional

import numpy as np

from ettin_jax.model import GLOBAL, LOCAL, ModelConfig

ARCHITECTURES = {
    "encoder": dict(model_type="modernbert", cls="ModernBertForMaskedLM", head="head"),
    "decoder": dict(model_type="modernbert-decoder", cls="ModernBertDecoderForCausalLM", head="lm_head"),
}
_MODEL_TYPES = {v["model_type"]: k for k, v in ARCHITECTURES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "ettin_tokenizer.json")


# What `ettin import` of a decoder prints (and each exported decoder's model card says).
FUSED_QKV_NOTE = (
    "Note on continuing this decoder: ettin keeps attention's q/k/v as one fused Wqkv tensor, as Ettin trained both "
    "models; transformers' ModernBertDecoder stores q_proj, k_proj and v_proj. The conversion is exact, but "
    "StableAdamW clips its learning rate per tensor, so continuing the same checkpoint in transformers with "
    "optimi's StableAdamW (three tensors) is not the same training: over 30 steps v_proj moved ~1.7e-2 differently "
    "while the losses agreed to 2e-6. `ettin train --config.init_from=...` continues it as Ettin trained it.")


class ConversionError(ValueError):
    """A Hugging Face folder or state dict does not match what the conversion expects."""


def _check_arch(arch: str):
    if arch not in ARCHITECTURES:
        raise ConversionError(f"architecture {arch!r} is not one of {sorted(ARCHITECTURES)}")


# ---------------------------------------------------------------------------------------------------- config


def hf_config(cfg: ModelConfig, arch: str) -> dict:
    """config.json contents for `arch` ('encoder' or 'decoder')."""
    _check_arch(arch)
    if arch == "decoder" and cfg.decoder_window not in (None, cfg.local_window):
        # HF's decoder derives its window (keys, query included) from local_attention // 2 only.
        raise ConversionError(
            f"decoder_window={cfg.decoder_window} cannot be expressed in ModernBertDecoder's config "
            f"(it sees local_attention // 2 = {cfg.local_window} keys); export with decoder_window=None")
    a = ARCHITECTURES[arch]
    d = dict(
        architectures=[a["cls"]], model_type=a["model_type"],
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        hidden_activation="gelu", classifier_activation="gelu",
        max_position_embeddings=cfg.max_position_embeddings, norm_eps=cfg.norm_eps, norm_bias=False,
        attention_bias=False, mlp_bias=False, decoder_bias=True, tie_word_embeddings=True,
        attention_dropout=cfg.attention_dropout, embedding_dropout=0.0, mlp_dropout=0.0,
        initializer_range=cfg.init_std, initializer_cutoff_factor=2.0,
        layer_types=list(cfg.layer_types), local_attention=2 * cfg.local_window,
        rope_parameters={GLOBAL: {"rope_type": "default", "rope_theta": float(cfg.global_rope_theta)},
                         LOCAL: {"rope_type": "default", "rope_theta": float(cfg.local_rope_theta)}},
        # Older transformers read these names instead.
        global_rope_theta=float(cfg.global_rope_theta), local_rope_theta=float(cfg.local_rope_theta),
        global_attn_every_n_layers=cfg.global_every,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.cls_token_id, eos_token_id=cfg.sep_token_id,
        cls_token_id=cfg.cls_token_id, sep_token_id=cfg.sep_token_id, torch_dtype="float32",
    )
    if arch == "encoder":
        d.update(sparse_prediction=False, classifier_pooling="mean")
    else:
        d.update(use_cache=True)
    return d


def _local_attention(hf: dict, arch: str) -> int:
    """The total sliding window (HF `local_attention`), from `local_attention` or the decoder's `sliding_window`
    (= local_attention // 2); both present must agree."""
    total, half = hf.get("local_attention"), hf.get("sliding_window") if arch == "decoder" else None
    if total is None and half is None:
        raise ConversionError("config.json: no sliding-window width (looked for local_attention"
                              + (" and sliding_window" if arch == "decoder" else "") + "); refusing to guess")
    if total is not None and (not isinstance(total, int) or total <= 0 or total % 2):
        raise ConversionError(f"config.json: local_attention={total!r}, expected a positive even window")
    if half is not None and (not isinstance(half, int) or half <= 0):
        raise ConversionError(f"config.json: sliding_window={half!r}, expected a positive integer")
    if total is not None and half is not None and half != total // 2:
        raise ConversionError(f"config.json: sliding_window={half} disagrees with local_attention={total} "
                              f"(expected sliding_window = local_attention // 2 = {total // 2})")
    return total if total is not None else 2 * half


def model_config_from_hf(hf: dict, **overrides) -> tuple[ModelConfig, str]:
    """(ModelConfig, arch) from a config.json dict, reading old and new transformers field names."""
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ConversionError(f"config.json: model_type is {model_type!r}, expected one of {sorted(_MODEL_TYPES)}")
    arch = _MODEL_TYPES[model_type]

    def need(field):
        if field not in hf:
            raise ConversionError(f"config.json: field {field!r} is missing")
        return hf[field]

    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    if hidden % heads:
        raise ConversionError(
            f"config.json: num_attention_heads={heads} does not divide hidden_size={hidden}")
    for flag in ("norm_bias", "attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise ConversionError(f"config.json: {flag}=true is not supported (Ettin has no such biases)")
    if hf.get("hidden_activation", "gelu") != "gelu" or hf.get("classifier_activation", "gelu") != "gelu":
        raise ConversionError("config.json: activations other than exact 'gelu' are not supported, found "
                              f"hidden_activation={hf.get('hidden_activation')!r}, "
                              f"classifier_activation={hf.get('classifier_activation')!r}")
    layer_types = hf.get("layer_types")
    every = hf.get("global_attn_every_n_layers")
    if not layer_types:
        if not every:
            raise ConversionError("config.json: no layer types (looked for layer_types and "
                                  "global_attn_every_n_layers); refusing to guess which layers are global")
        layer_types = [GLOBAL if i % every == 0 else LOCAL for i in range(layers)]
    every = every or 3  # only names the pattern in our config; layer_types above is what the model uses
    rope = hf.get("rope_parameters") or {}
    global_theta = (rope.get(GLOBAL) or {}).get("rope_theta", hf.get("global_rope_theta"))
    local_theta = (rope.get(LOCAL) or {}).get("rope_theta", hf.get("local_rope_theta"))
    if local_theta is None and hf.get("local_rope_theta", "absent") is None:
        local_theta = global_theta  # old ModernBERT configs: local_rope_theta null means "same as global"
    for name, value in (("global rope theta", global_theta), ("local rope theta", local_theta)):
        if value is None:
            raise ConversionError(
                f"config.json: no {name} (looked for rope_parameters[...]['rope_theta'], "
                "global_rope_theta, local_rope_theta)")
    local_attention = _local_attention(hf, arch)
    fields = dict(
        vocab_size=need("vocab_size"), hidden_size=hidden, intermediate_size=need("intermediate_size"),
        num_layers=layers, num_heads=heads, global_every=every, layer_types=tuple(layer_types),
        local_window=local_attention // 2, global_rope_theta=float(global_theta),
        local_rope_theta=float(local_theta),
        max_position_embeddings=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("norm_eps", 1e-5),
        init_std=hf.get("initializer_range", 0.02), attention_dropout=float(hf.get("attention_dropout", 0.0)),
    )
    for ours, theirs in (("pad_token_id", "pad_token_id"), ("cls_token_id", "cls_token_id"),
                         ("sep_token_id", "sep_token_id")):
        if hf.get(theirs) is not None:
            fields[ours] = hf[theirs]
    # The mask and unknown tokens live in the tokenizer, not config.json; a released ModernBERT vocabulary has
    # them at [MASK] 50284 / [UNK] 50280 (our defaults), our own tokenizers wherever they put them.
    fields.update(overrides)
    try:
        return ModelConfig(**fields), arch
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from None


# ------------------------------------------------------------------------------------------------ state dict


def _table(cfg: ModelConfig, arch: str):
    """(our path, HF name, transpose) for every tensor except the decoder's split q/k/v."""
    head = ARCHITECTURES[arch]["head"]
    rows = [(("tok_embeddings", "embedding"), "model.embeddings.tok_embeddings.weight", False),
            (("embed_norm", "scale"), "model.embeddings.norm.weight", False)]
    for i in range(cfg.num_layers):
        p, h = f"layers_{i}", f"model.layers.{i}"
        if i:
            rows.append(((p, "attn_norm", "scale"), f"{h}.attn_norm.weight", False))
        if arch == "encoder":
            rows.append(((p, "attn", "Wqkv", "kernel"), f"{h}.attn.Wqkv.weight", True))
        rows += [((p, "attn", "Wo", "kernel"), f"{h}.attn.Wo.weight", True),
                 ((p, "mlp_norm", "scale"), f"{h}.mlp_norm.weight", False),
                 ((p, "mlp", "Wi", "kernel"), f"{h}.mlp.Wi.weight", True),
                 ((p, "mlp", "Wo", "kernel"), f"{h}.mlp.Wo.weight", True)]
    rows += [(("final_norm", "scale"), "model.final_norm.weight", False),
             (("head_dense", "kernel"), f"{head}.dense.weight", True),
             (("head_norm", "scale"), f"{head}.norm.weight", False),
             (("decoder_bias",), "decoder.bias", False)]
    return rows


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _put(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def to_hf_state_dict(params, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """Our parameter pytree -> HF tensor names and [out, in] float32 numpy arrays."""
    _check_arch(arch)
    out = {}
    for path, name, transpose in _table(cfg, arch):
        x = np.asarray(_get(params, path), np.float32)
        out[name] = np.ascontiguousarray(x.T if transpose else x)
    if arch == "decoder":
        h = cfg.hidden_size
        for i in range(cfg.num_layers):
            w = np.asarray(params[f"layers_{i}"]["attn"]["Wqkv"]["kernel"], np.float32)
            for j, n in enumerate("qkv"):
                out[f"model.layers.{i}.attn.{n}_proj.weight"] = np.ascontiguousarray(w[:, j * h:(j + 1) * h].T)
    return out


def expected_shapes(cfg: ModelConfig, arch: str) -> dict[str, tuple]:
    """HF tensor name -> shape, for validating a folder before anything is converted."""
    from ettin_jax.model import abstract_params
    shapes, _ = abstract_params(cfg)
    return {k: v.shape for k, v in to_hf_state_dict(
        __import__("jax").tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes), cfg, arch).items()}


def from_hf_state_dict(sd: dict, cfg: ModelConfig, arch: str) -> dict:
    """HF tensors -> our parameter pytree (float32 numpy). Validates names and shapes first."""
    _check_arch(arch)
    h = cfg.hidden_size

    def take(name, shape):
        if name not in sd:
            raise ConversionError(f"tensor {name} is missing (expected shape {tuple(shape)})")
        x = np.asarray(sd[name])
        if tuple(x.shape) != tuple(shape):
            raise ConversionError(f"tensor {name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
        return x.astype(np.float32)

    shape_of = {
        "tok_embeddings": (cfg.vocab_size, h), "decoder_bias": (cfg.vocab_size,),
        "Wqkv": (3 * h, h), "Wo": None, "Wi": (2 * cfg.intermediate_size, h),
    }
    params: dict = {}
    for path, name, transpose in _table(cfg, arch):
        if path[-1] == "scale":
            shape = (h,)
        elif path[0] == "tok_embeddings":
            shape = shape_of["tok_embeddings"]
        elif path[0] == "decoder_bias":
            shape = shape_of["decoder_bias"]
        elif path[-2] == "Wqkv":
            shape = shape_of["Wqkv"]
        elif path[-2] == "Wi":
            shape = shape_of["Wi"]
        elif path[-3:-1] == ("mlp", "Wo"):
            shape = (h, cfg.intermediate_size)
        else:  # attn Wo, head dense
            shape = (h, h)
        x = take(name, shape)
        _put(params, path, np.ascontiguousarray(x.T) if transpose else x)
    if arch == "decoder":
        for i in range(cfg.num_layers):
            qkv = [take(f"model.layers.{i}.attn.{n}_proj.weight", (h, h)) for n in "qkv"]
            _put(params, (f"layers_{i}", "attn", "Wqkv", "kernel"), np.ascontiguousarray(np.concatenate(qkv, 0).T))
    if "decoder.weight" in sd and not np.array_equal(np.asarray(sd["decoder.weight"]),
                                                     np.asarray(sd["model.embeddings.tok_embeddings.weight"])):
        raise ConversionError("tensor decoder.weight differs from model.embeddings.tok_embeddings.weight; "
                              "Ettin ties them (tie_word_embeddings=true)")
    known = {n for _, n, _ in _table(cfg, arch)} | {"decoder.weight"}
    if arch == "decoder":
        known |= {f"model.layers.{i}.attn.{n}_proj.weight" for i in range(cfg.num_layers) for n in "qkv"}
    extra = sorted(set(sd) - known)
    if extra:
        raise ConversionError(f"unexpected tensor {extra[0]} (and {len(extra) - 1} more) for a {arch}")
    return params


# ---------------------------------------------------------------------------------------------- HF folders


def save_hf_folder(params, cfg: ModelConfig, arch: str, out_dir: str, tokenizer_dir: Optional[str] = None, *,
                   provenance: Optional[dict] = None, pooling: str = "mean"):
    """Writes a folder that transformers, sentence-transformers (encoders) and lm-evaluation-harness (decoders) load
    with no argument beyond its path: config.json, model.safetensors, the tokenizer files for `arch`
    (`tokenizer.write_hf_tokenizer`), a decoder's generation_config.json, an encoder's sentence-transformers files
    (`pooling`: how our evaluation pools, `SENTENCE_TRANSFORMERS_POOLING`), and the model card README.md (with
    `provenance`, from `workdir_provenance`). Written to a temporary folder first and renamed into place, so a
    failure leaves nothing half-written."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file
    config = hf_config(cfg, arch)
    tensors = to_hf_state_dict(params, cfg, arch)
    if tokenizer_dir and not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise ConversionError(f"no tokenizer.json in {tokenizer_dir}")
    if arch == "encoder" and pooling not in SENTENCE_TRANSFORMERS_POOLING:
        raise ConversionError(f"pooling {pooling!r} is not one of {sorted(SENTENCE_TRANSFORMERS_POOLING)}")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_json(tmp, "config.json", config)
        path = os.path.join(tmp, "model.safetensors")
        try:
            save_file(tensors, path, metadata={"format": "pt"})
        except SafetensorError as e:  # e.g. a full disk, as "... (os error 28)", naming no file
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code:
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None
            raise
        if arch == "decoder":
            from ettin_jax.inference import DEFAULT_MAX_NEW_TOKENS
            # Greedy, as `ettin generate` without sampling flags, and as many new tokens as its default.
            _write_json(tmp, "generation_config.json", dict(
                bos_token_id=cfg.cls_token_id, eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id,
                do_sample=False, max_new_tokens=DEFAULT_MAX_NEW_TOKENS))
        if tokenizer_dir:
            if not any(os.path.exists(os.path.join(tokenizer_dir, name)) for name in TOKENIZER_FILES):
                raise ConversionError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
            from ettin_jax.tokenizer import write_hf_tokenizer
            write_hf_tokenizer(tokenizer_dir, tmp, arch, {k: getattr(cfg, f"{k}_token_id")
                                                          for k in ("unk", "cls", "sep", "pad", "mask")})
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.exists(src) and not os.path.exists(os.path.join(tmp, name)):
                    shutil.copy(src, tmp)
            if arch == "encoder":
                _write_sentence_transformers(tmp, cfg, pooling)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(cfg, arch, out_dir, num_params=sum(int(np.size(x)) for x in tensors.values()),
                               provenance=provenance, pooling=pooling if arch == "encoder" and tokenizer_dir
                               else None))
    except ValueError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(str(e)) from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None and e.errno:  # a write that failed mid-file (a full disk) names no file: name the folder
            raise OSError(e.errno, os.strerror(e.errno), out_dir) from None
        raise
    except Exception as e:  # the tokenizers library reports a full disk as a bare "... (os error 28)"
        shutil.rmtree(tmp, ignore_errors=True)
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), out_dir) from None
        raise
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def _write_json(folder: str, name: str, obj):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# Our pooling names (ettin_jax.evaluation.models.pool) -> sentence-transformers' Pooling flags.
SENTENCE_TRANSFORMERS_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}


def _write_sentence_transformers(folder: str, cfg: ModelConfig, pooling: str):
    """modules.json (Transformer, then Pooling), 1_Pooling/config.json, sentence_bert_config.json and
    config_sentence_transformers.json: `SentenceTransformer(folder)` then pools as our evaluation does. The
    classic module names, which sentence-transformers 2.x to 6.x all load."""
    _write_json(folder, "modules.json", [
        dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
        dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling")])
    modes = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
             "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
    _write_json(os.path.join(folder, "1_Pooling"), "config.json", dict(
        word_embedding_dimension=cfg.hidden_size, include_prompt=True,
        **{m: m == SENTENCE_TRANSFORMERS_POOLING[pooling] for m in modes}))
    _write_json(folder, "sentence_bert_config.json", dict(max_seq_length=cfg.max_position_embeddings,
                                                          do_lower_case=False))
    # Our retrieval evaluation ranks by cosine similarity (ettin_jax.evaluation.retrieval.rank).
    _write_json(folder, "config_sentence_transformers.json", dict(
        model_type="SentenceTransformer", similarity_fn_name="cosine", prompts={}, default_prompt_name=None))


# --------------------------------------------------------------------------------------------- model card


def workdir_provenance(workdir: str, arch: str, step: int) -> dict:
    """What a model card says about where a workdir's model comes from: the workdir, step, tokens, objective,
    phase, size, the training commands (commands.jsonl), the config, the data sources and the step's batch hash
    (metrics.jsonl), or the folder an imported workdir came from. Missing records are left out."""
    from ettin_jax import checkpoint
    out = dict(workdir=os.path.abspath(workdir), step=step)
    meta = checkpoint.read_meta(workdir, step) or {}
    out.update({k: meta[k] for k in ("tokens", "phase") if k in meta})
    config = checkpoint.read_json(workdir, "config.json")
    if config:
        import ml_collections
        from ettin_jax import recipe
        out["config"] = config
        out["size"] = config.get("size")
        out.setdefault("phase", config.get("phase"))
        try:
            out["objective"] = recipe.models_of(ml_collections.ConfigDict(config)).get(arch)
        except (ValueError, AttributeError, KeyError):
            pass
        out["data"] = [dict(name=src.get("name"), path=src.get("path"), weight=src.get("weight"))
                       for src in (config.get("data") or {}).get("sources", [])]
    out["commands"] = [c.get("command") for c in checkpoint.read_jsonl(workdir, "commands.jsonl")
                       if c.get("command") and c.get("start_step", 0) < step]
    logged = [m for m in checkpoint.read_jsonl(workdir, "metrics.jsonl")
              if m.get("batch_hash") and m.get("step", step + 1) <= step]
    if logged:
        last = max(logged, key=lambda m: m["step"])
        out["batch_hash"] = dict(step=last["step"], hash=last["batch_hash"])
    imported = checkpoint.read_json(workdir, "imported.json")
    if imported:
        out["imported_from"] = imported.get("source")
    return {k: v for k, v in out.items() if v not in (None, [], {})}


def _code(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text}\n```"


def model_card(cfg: ModelConfig, arch: str, path: str, *, num_params: int, provenance: Optional[dict] = None,
               pooling: Optional[str] = None) -> str:
    """The README.md of an exported folder: architecture, size, parameters, objective, phase and tokens, how it was
    made and where it comes from, and how to load it in transformers, sentence-transformers and lm_eval."""
    p = provenance or {}
    cls, model_type = ARCHITECTURES[arch]["cls"], ARCHITECTURES[arch]["model_type"]
    n_global = sum(t == GLOBAL for t in cfg.layer_types)
    tags = ["ettin", "modernbert", "ettin-jax"] + (["sentence-transformers"] if pooling else [])
    trained = ", ".join(([f"{p['tokens']:,} non-pad tokens"] if "tokens" in p else [])
                        + ([f"step {p['step']}"] if "step" in p else [])) or "not recorded"
    rows = [
        ("architecture", f"`{cls}` (model_type `{model_type}`)"),
        ("size", p.get("size", "not recorded")),
        ("parameters", f"{num_params:,} (the token embedding, {cfg.vocab_size * cfg.hidden_size:,}, is tied to "
                       "the output decoder)"),
        ("shape", f"{cfg.num_layers} layers ({n_global} global, {cfg.num_layers - n_global} local), hidden "
                  f"{cfg.hidden_size}, {cfg.num_heads} heads, intermediate {cfg.intermediate_size}, vocabulary "
                  f"{cfg.vocab_size}"),
        ("attention", f"{'bidirectional' if arch == 'encoder' else 'causal'}, local window {2 * cfg.local_window} "
                      f"(total), RoPE theta {cfg.global_rope_theta:g} global / {cfg.local_rope_theta:g} local, "
                      f"{cfg.max_position_embeddings} positions"),
        ("objective", p.get("objective", "not recorded")),
        ("phase", p.get("phase", "not recorded")),
        ("trained", trained),
    ]
    lines = (["---", "library_name: transformers",
              f"pipeline_tag: {'fill-mask' if arch == 'encoder' else 'text-generation'}", "tags:"]
             + [f"- {t}" for t in tags] + ["---", ""]
             + [f"# Ettin {arch}{' ' + p['size'] if p.get('size') else ''} (ettin-jax)", "",
                f"A ModernBERT {arch} trained the way [Ettin](https://arxiv.org/abs/2507.11412) trains its paired "
                "models, written by `ettin export`.", "", "| | |", "|---|---|"]
             + [f"| {k} | {v} |" for k, v in rows] + ["", "## Provenance", ""])
    if p.get("workdir"):
        lines.append(f"- workdir `{p['workdir']}`, checkpoint step {p.get('step')}")
    else:
        lines.append("- not exported from a workdir: written by `ettin_jax.hf.save_hf_folder`")
    lines += [f"- {note}" for note in p.get("notes", [])]
    if p.get("imported_from"):
        lines.append(f"- imported (`ettin import`) from `{p['imported_from']}`")
    if p.get("commands"):
        lines.append("- trained by")
        lines += ["", _code("\n".join(p["commands"]), "bash"), ""]
    elif p.get("workdir"):
        lines.append("- training command: not recorded (the workdir has no commands.jsonl)")
    if p.get("export_command"):
        lines += ["- exported by", "", _code(p["export_command"], "bash"), ""]
    if p.get("data"):
        lines.append("- data: " + ", ".join(f"{d['name']} (`{d['path']}`, weight {d['weight']})" for d in p["data"]))
    if p.get("batch_hash"):
        lines.append(f"- batch hash of step {p['batch_hash']['step']} (metrics.jsonl; equal hashes mean equal "
                     f"batches): `{p['batch_hash']['hash']}`")
    if p.get("config"):
        lines += ["", "<details><summary>config.json of the run</summary>", "",
                  _code(json.dumps(p["config"], indent=2, sort_keys=True), "json"), "", "</details>"]
    lines += ["", "## Use", "", "transformers:", ""]
    if arch == "encoder":
        lines += [_code(f'from transformers import pipeline\nfill = pipeline("fill-mask", model="{path}")\n'
                        'fill("The capital of France is [MASK].")  # the same top-k as `ettin fill-mask`', "python")]
    else:
        lines += [_code(f'from transformers import pipeline\ngenerate = pipeline("text-generation", model="{path}")\n'
                        'generate("def main(")  # greedy, as `ettin generate --greedy` (generation_config.json)',
                        "python"),
                  "", "The tokenizer starts a text with [CLS] (BOS) and adds no [SEP] (EOS), as the decoder was "
                  "trained; generation stops at [SEP]."]
    lines += ["", "sentence-transformers:", ""]
    if pooling:
        lines += [_code(f'from sentence_transformers import SentenceTransformer\n'
                        f'model = SentenceTransformer("{path}")  # {pooling} pooling, as in ettin eval retrieval\n'
                        'embeddings = model.encode(["a sentence", "another one"])', "python")]
    else:
        lines += ["This folder carries no sentence-transformers configuration"
                  + (": embeddings are the encoder's (export the paired encoder)." if arch == "decoder" else ".")]
    lines += ["", "lm-evaluation-harness:", ""]
    if arch == "decoder":
        lines += [_code(f"lm_eval --model hf --model_args pretrained={path} --tasks hellaswag  # --device cpu "
                        "without a GPU", "bash")]
    else:
        lines += ["lm_eval's `hf` model scores causal models; an encoder is scored by masked pseudo-log-likelihood "
                  "through ettin-jax's adapter:", "",
                  _code(f"python -m ettin_jax.evaluation.lm_eval_adapter --model ettin "
                        f"--model_args pretrained={path},pll=True --tasks hellaswag", "bash")]
    lines += ["", "ettin-jax:", "",
              _code((f'ettin fill-mask --model={path} --text="The capital of France is [MASK]."' if arch == "encoder"
                     else f'ettin generate --model={path} --prompt="def main(" --greedy')
                    + f"\nettin import --hf={path} --workdir=NEW_WORKDIR   # continue training", "bash")]
    if arch == "decoder":
        lines += ["", FUSED_QKV_NOTE]
    return "\n".join(lines) + "\n"


def read_hf_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if files:
        sd = {}
        for f in files:
            path = os.path.join(hf_dir, f)
            try:
                sd.update(load_file(path))
            except (SafetensorError, OSError) as e:  # a download cut short, a disk error, a folder of that name
                size = f"{os.path.getsize(path):,} bytes" if os.path.isfile(path) else "not a file"
                raise ConversionError(f"{path} ({size}) is not a complete safetensors file ({e}); download or "
                                      "export it again") from None
        return sd
    if os.path.exists(os.path.join(hf_dir, "pytorch_model.bin")):
        import torch
        sd = torch.load(os.path.join(hf_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise ConversionError(f"{hf_dir}: no model.safetensors (or pytorch_model.bin) found")


def _tokenizer_special_ids(hf_dir: str) -> dict:
    """mask/unk ids from the folder's tokenizer.json (config.json does not carry them), when it has one."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(path):
        return {}
    added = {t["content"]: t["id"] for t in _read_json(path).get("added_tokens", [])}
    found = {"mask_token_id": added.get("[MASK]", added.get("<mask>")), "unk_token_id": added.get("[UNK]")}
    return {k: v for k, v in found.items() if v is not None}


def _read_json(path: str) -> dict:
    """A JSON object from a file of a Hugging Face folder; a malformed one is a ConversionError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); the file was cut short or damaged") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a JSON {type(obj).__name__}, expected an object")
    return obj


def load_hf_folder(hf_dir: str) -> tuple[dict, ModelConfig, str]:
    """(params, ModelConfig, arch) from a Hugging Face folder (ours or a released Ettin checkpoint)."""
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir!r} is not a folder: expected a Hugging Face folder (config.json and "
                              "model.safetensors)")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{hf_dir}: config.json is missing")
    hf = _read_json(path)
    cfg, arch = model_config_from_hf(hf, **_tokenizer_special_ids(hf_dir))
    sd = read_hf_state_dict(hf_dir)
    # Checkpoints saved in bf16 (or with a "model." prefix-less layout) are normalised here.
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    return from_hf_state_dict(sd, cfg, arch), cfg, arch


# ------------------------------------------------------------------------------------------ workdir <-> HF


def export_workdir(workdir: str, out: str, *, step: Optional[int] = None, which: Optional[str] = None,
                   as_arch: Optional[str] = None, export_command: Optional[str] = None) -> dict[str, str]:
    """Writes a workdir's model(s) as HF folders; a paired workdir without `which` gives out/encoder, out/decoder.
    Each folder's model card quotes `export_command` (default: the `ettin export` command of these arguments).

    as_arch exports a model as the other architecture (a cross-objective encoder-from-decoder is already an
    'encoder' in its workdir; as_arch is for loading, say, a decoder's weights as ModernBertForMaskedLM).
    Returns {arch: folder}.
    """
    from ettin_jax import checkpoint
    models = checkpoint.load_models(workdir)
    chosen = [which] if which else sorted(models)
    if which and which not in models:
        raise ConversionError(f"{workdir} holds {sorted(models)}, not {which!r}")
    steps = checkpoint.checkpoint_steps(workdir)
    if not steps:
        raise ConversionError(f"{workdir} has no checkpoints")
    step = steps[-1] if step is None else step  # explicit, so that the model card names the step exported
    command = export_command or shlex.join(["ettin", "export", f"--workdir={workdir}", f"--out={out}"]
                                           + ([f"--which={which}"] if which else [])
                                           + ([f"--as={as_arch}"] if as_arch else []))
    written = {}
    for arch in chosen:
        try:
            params, cfg, arch, tok = checkpoint.load_model_from_workdir(workdir, arch, step)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as e:  # a corrupt or partial checkpoint (Orbax's errors have no common type)
            raise ConversionError(f"checkpoint {step} of {workdir} cannot be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); export another with --step (it has "
                                  f"{steps})") from None
        target = as_arch or arch
        _check_arch(target)
        folder = out if len(chosen) == 1 else os.path.join(out, arch)
        provenance = dict(workdir_provenance(workdir, arch, step), export_command=command)
        save_hf_folder(params, cfg, target, folder, tok, provenance=provenance)
        written[arch] = folder
    return written


def import_hf(hf_dir: str, workdir: str, *, as_arch: Optional[str] = None) -> str:
    """Reads an HF folder into a new workdir (a step-0 checkpoint with no optimizer state) that training can
    start from with --config.init_from=WORKDIR. Everything is validated and written to a temporary folder first."""
    from ettin_jax import checkpoint
    if os.path.exists(workdir) and os.listdir(workdir):
        raise ConversionError(f"{workdir} exists and is not empty; import into a new workdir")
    params, cfg, arch = load_hf_folder(hf_dir)
    arch = as_arch or arch
    _check_arch(arch)
    tmp = workdir.rstrip("/") + ".import-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        checkpoint.save_models(tmp, {arch: cfg})
        if any(os.path.exists(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES):
            os.makedirs(os.path.join(tmp, "tokenizer"))
            for f in TOKENIZER_FILES:
                if os.path.exists(os.path.join(hf_dir, f)):
                    shutil.copy(os.path.join(hf_dir, f), os.path.join(tmp, "tokenizer"))
        ck = checkpoint.Checkpoints(tmp, async_save=False)
        ck.save(0, params={arch: params}, meta=dict(step=0, tokens=0, imported_from=os.path.abspath(hf_dir)))
        ck.close()
        checkpoint.write_json(tmp, "imported.json", dict(source=os.path.abspath(hf_dir), arch=arch))
        if os.path.exists(workdir):
            os.rmdir(workdir)
        os.rename(tmp, workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return workdir


def checkpoint_arch(workdir: str) -> Optional[str]:
    """The architecture of a single-model workdir (an import), or None."""
    from ettin_jax import checkpoint
    models = checkpoint.load_models(workdir)
    return next(iter(models)) if len(models) == 1 else None


def main(argv, subcommand=None):
    """`ettin export` and `ettin import`."""
    import sys
    from absl import flags
    from ettin_jax import cli

    fv = flags.FlagValues()
    if subcommand == "export":
        flags.DEFINE_string("workdir", None, "training workdir to export", flag_values=fv)
        flags.DEFINE_string("out", None, "output folder (a paired workdir gives OUT/encoder and OUT/decoder)",
                            flag_values=fv)
        flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
        flags.DEFINE_enum("which", None, ["encoder", "decoder"], "which model of a paired workdir", flag_values=fv)
        usage_line = "--workdir=DIR --out=HF_DIR [--step=N] [--which=encoder|decoder] [--as=encoder|decoder]"
    else:
        flags.DEFINE_string("hf", None, "Hugging Face folder (config.json + model.safetensors)", flag_values=fv)
        flags.DEFINE_string("workdir", None, "new workdir to write", flag_values=fv)
        usage_line = "--hf=HF_DIR --workdir=NEW_DIR [--as=encoder|decoder]"
    flags.DEFINE_enum("as", None, ["encoder", "decoder"], "load/export as this architecture", flag_values=fv)
    rest = cli.parse_flags(fv, argv, usage_line)
    if isinstance(rest, int):
        return rest
    try:
        if subcommand == "export":
            if not fv.workdir or not fv.out:
                raise ConversionError("--workdir and --out are required")
            for arch, folder in export_workdir(fv.workdir, fv.out, step=fv.step, which=fv.which,
                                               as_arch=fv["as"].value,
                                               export_command=shlex.join(["ettin", "export"] + argv[1:])).items():
                print(f"exported the {arch} to {folder}")
        else:
            if not fv.hf or not fv.workdir:
                raise ConversionError("--hf and --workdir are required")
            import_hf(fv.hf, fv.workdir, as_arch=fv["as"].value)
            print(f"imported {fv.hf} into {fv.workdir}; continue training with "
                  f"--config.init_from={fv.workdir} --config.init_mode=weights")
            if checkpoint_arch(fv.workdir) == "decoder":
                print(FUSED_QKV_NOTE)
    except (ConversionError, ValueError, OSError) as e:
        print(f"{argv[0]}: error: {cli.user_error(e) or e}", file=sys.stderr)
        return 2
    return 0
