"""Conversion to and from Hugging Face transformers (ModernBertForMaskedLM / ModernBertDecoderForCausalLM).

Our parameter names follow the Hugging Face modules, so conversion is a table: for each of our leaves, the HF
tensor name, and whether the [in, out] kernel is transposed to torch's [out, in]. The encoder stores attention as
one fused Wqkv, the HF decoder as separate q/k/v projections: those are split on export and concatenated on import
(both exact). The decoder weight is tied to the token embedding and not written separately.

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


def save_hf_folder(params, cfg: ModelConfig, arch: str, out_dir: str, tokenizer_dir: Optional[str] = None):
    """Writes config.json, model.safetensors and the tokenizer files; written to a temporary folder first and
    renamed into place, so a failure leaves nothing half-written."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file
    config = hf_config(cfg, arch)
    tensors = to_hf_state_dict(params, cfg, arch)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    path = os.path.join(tmp, "model.safetensors")
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:  # e.g. a full disk, as "... (os error 28)", naming no file
        shutil.rmtree(tmp, ignore_errors=True)
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None
        raise
    if tokenizer_dir:
        copied = 0
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copy(src, tmp)
                copied += 1
        if not copied:
            raise ConversionError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


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
                   as_arch: Optional[str] = None) -> dict[str, str]:
    """Writes a workdir's model(s) as HF folders; a paired workdir without `which` gives out/encoder, out/decoder.

    as_arch exports a model as the other architecture (a cross-objective encoder-from-decoder is already an
    'encoder' in its workdir; as_arch is for loading, say, a decoder's weights as ModernBertForMaskedLM).
    Returns {arch: folder}.
    """
    from ettin_jax import checkpoint
    models = checkpoint.load_models(workdir)
    chosen = [which] if which else sorted(models)
    if which and which not in models:
        raise ConversionError(f"{workdir} holds {sorted(models)}, not {which!r}")
    written = {}
    for arch in chosen:
        params, cfg, arch, tok = checkpoint.load_model_from_workdir(workdir, arch, step)
        target = as_arch or arch
        _check_arch(target)
        folder = out if len(chosen) == 1 else os.path.join(out, arch)
        save_hf_folder(params, cfg, target, folder, tok)
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
                                               as_arch=fv["as"].value).items():
                print(f"exported the {arch} to {folder}")
        else:
            if not fv.hf or not fv.workdir:
                raise ConversionError("--hf and --workdir are required")
            import_hf(fv.hf, fv.workdir, as_arch=fv["as"].value)
            print(f"imported {fv.hf} into {fv.workdir}; continue training with "
                  f"--config.init_from={fv.workdir} --config.init_mode=weights")
    except (ConversionError, ValueError, OSError) as e:
        print(f"{argv[0]}: error: {cli.user_error(e) or e}", file=sys.stderr)
        return 2
    return 0
