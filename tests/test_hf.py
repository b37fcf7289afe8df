"""Hugging Face parity: import, export, round trip and bad folders (CPU, fp32, random weights)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, ModernBertConfig, ModernBertDecoderConfig,
                          ModernBertDecoderForCausalLM, ModernBertForMaskedLM)

from ettin_jax import attention, hf, model

HF_CLASSES = {"encoder": (ModernBertConfig, ModernBertForMaskedLM, attention.BIDIRECTIONAL),
              "decoder": (ModernBertDecoderConfig, ModernBertDecoderForCausalLM, attention.CAUSAL)}
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
              max_position_embeddings=1024, local_attention=128,
              # A large init range (10x ModernBERT's 0.02) and a random decoder bias keep logits far from uniform.
              # Not larger: at 0.3, transformers' own fp32 logits differ from its float64 ones by up to 1.5e-4 on
              # our CPU, more than the 1e-4 bound; at 0.2 that rounding noise is ~8e-6 with logits still up to ~8.
              initializer_range=0.2)
T = 400  # longer than three local windows of 128


def _hf_model(arch, seed=0, **kw):
    torch.manual_seed(seed)
    cfg_cls, model_cls, _ = HF_CLASSES[arch]
    config = cfg_cls(**{**COMMON, **kw}, global_rope_theta=160_000.0, local_rope_theta=10_000.0)
    config._attn_implementation = "sdpa"
    m = model_cls(config).eval()
    with torch.no_grad():
        m.decoder.bias.normal_(0.0, 1.0)
    return m


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 512, (2, T))
    am = np.ones((2, T), np.int64)
    am[1, 290:] = 0  # padding
    ids[1, 290:] = 3
    return ids, am


def _reference_logits(hf_model, ids, am):
    """transformers' fp32 logits, after checking that their own rounding noise (fp32 vs float64) sits well below
    the 1e-4 parity bound, so that the bound measures our function and not rounding luck."""
    inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am))
    with torch.no_grad():
        ref = hf_model(**inputs).logits.numpy()
        ref64 = hf_model.double()(**inputs).logits.numpy()
    hf_model.float()
    valid = am.astype(bool)
    assert np.abs(ref[valid]).max() > 5  # not near-uniform
    assert np.abs(ref[valid] - ref64[valid]).max() < 1e-5, "ill-conditioned parity test: fp32 noise near the bound"
    return ref


def _our_logits(params, cfg, arch, ids, am):
    m = model.Ettin(cfg)
    fwd = jax.jit(lambda p, x, s: m.apply({"params": p}, m.apply({"params": p}, x, mask=HF_CLASSES[arch][2],
                                                                   segment_ids=s), method=model.Ettin.predict))
    return np.asarray(fwd(params, jnp.asarray(ids), jnp.asarray(am)))


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_import_matches_transformers_logits(arch, tmp_path):
    hf_model = _hf_model(arch)
    hf_model.save_pretrained(tmp_path)
    params, cfg, got_arch = hf.load_hf_folder(str(tmp_path))
    assert got_arch == arch and cfg.global_rope_theta == 160_000.0 and cfg.local_rope_theta == 10_000.0
    ids, am = _batch()
    ref = _reference_logits(hf_model, ids, am)
    ours = _our_logits(params, cfg, arch, ids, am)
    valid = am.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-4


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_export_loads_in_transformers_with_same_logits(arch, tmp_path):
    cfg = model.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                            global_rope_theta=160_000.0, local_rope_theta=10_000.0, init_std=0.2,
                            pad_token_id=3, cls_token_id=1, sep_token_id=2)
    params = model.init_params(cfg, jax.random.key(1))
    params["decoder_bias"] = jax.random.normal(jax.random.key(2), params["decoder_bias"].shape)
    hf.save_hf_folder(params, cfg, arch, str(tmp_path / "out"))
    auto = AutoModelForMaskedLM if arch == "encoder" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path / "out", attn_implementation="sdpa").eval()
    assert type(loaded).__name__ == HF_CLASSES[arch][1].__name__
    ids, am = _batch()
    ref = _reference_logits(loaded, ids, am)
    ours = _our_logits(params, cfg, arch, ids, am)
    valid = am.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-4


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_import_then_export_is_bit_exact(arch, tmp_path):
    _hf_model(arch, seed=3).save_pretrained(tmp_path / "hf")
    params, cfg, got = hf.load_hf_folder(str(tmp_path / "hf"))
    hf.save_hf_folder(params, cfg, got, str(tmp_path / "again"))
    a = load_file(tmp_path / "hf" / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    a.pop("decoder.weight", None)  # tied: the same tensor as the token embedding
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_decoder_exported_as_encoder(tmp_path):
    """Cross-objective: a decoder's weights load as ModernBertForMaskedLM."""
    _hf_model("decoder").save_pretrained(tmp_path / "dec")
    params, cfg, _ = hf.load_hf_folder(str(tmp_path / "dec"))
    hf.save_hf_folder(params, cfg, "encoder", str(tmp_path / "enc"))
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "enc")
    assert type(loaded).__name__ == "ModernBertForMaskedLM"
    back, _, arch = hf.load_hf_folder(str(tmp_path / "enc"))
    assert arch == "encoder"
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_old_config_field_names(tmp_path):
    old = dict(model_type="modernbert", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, global_attn_every_n_layers=2, global_rope_theta=160000.0,
               local_rope_theta=None, local_attention=64)
    cfg, arch = hf.model_config_from_hf(old)
    assert arch == "encoder" and cfg.layer_types == (model.GLOBAL, model.LOCAL, model.GLOBAL, model.LOCAL)
    assert cfg.local_rope_theta == 160000.0 and cfg.local_window == 32


def test_import_never_assumes_layer_types_or_windows():
    base = dict(model_type="modernbert-decoder", vocab_size=512, hidden_size=64, intermediate_size=96,
                num_hidden_layers=4, num_attention_heads=4, global_rope_theta=160000.0, local_rope_theta=10000.0,
                global_attn_every_n_layers=3, local_attention=128)
    without = lambda *names: {k: v for k, v in base.items() if k not in names}
    with pytest.raises(hf.ConversionError, match="no layer types .*layer_types and global_attn_every_n_layers"):
        hf.model_config_from_hf(without("global_attn_every_n_layers"))
    with pytest.raises(hf.ConversionError, match="no sliding-window width .*local_attention and sliding_window"):
        hf.model_config_from_hf(without("local_attention"))
    # The decoder's own field (half the total window) is read when local_attention is absent, and checked when not.
    cfg, _ = hf.model_config_from_hf({**without("local_attention"), "sliding_window": 32})
    assert cfg.local_window == 32
    with pytest.raises(hf.ConversionError, match=r"sliding_window=32 disagrees with local_attention=128 "
                                                 r"\(expected sliding_window = local_attention // 2 = 64\)"):
        hf.model_config_from_hf({**base, "sliding_window": 32})
    with pytest.raises(hf.ConversionError, match="local_attention=127, expected a positive even window"):
        hf.model_config_from_hf({**base, "local_attention": 127})
    # A folder transformers itself writes carries both names, consistently.
    saved = ModernBertDecoderConfig(**COMMON).to_dict()
    assert hf.model_config_from_hf(saved)[0].local_window == 64


def _folder(tmp_path, arch="encoder"):
    path = tmp_path / "f"
    _hf_model(arch).save_pretrained(path)
    return path


def _edit_config(path, **kw):
    c = json.loads((path / "config.json").read_text())
    c.update(kw)
    (path / "config.json").write_text(json.dumps(c))


def _edit_tensors(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors")


def test_bad_folders_give_one_line_errors(tmp_path):
    path = _folder(tmp_path)
    _edit_tensors(path, lambda sd: sd.pop("model.layers.2.mlp.Wo.weight"))
    with pytest.raises(hf.ConversionError, match=r"tensor model.layers.2.mlp.Wo.weight is missing \(expected shape \(64, 96\)\)"):
        hf.load_hf_folder(str(path))

    path = _folder(tmp_path)
    _edit_tensors(path, lambda sd: sd.__setitem__("model.final_norm.weight", np.ones(63, np.float32)))
    with pytest.raises(hf.ConversionError, match=r"model.final_norm.weight has shape \(63,\), expected \(64,\)"):
        hf.load_hf_folder(str(path))

    path = _folder(tmp_path)
    _edit_config(path, model_type="bert")
    with pytest.raises(hf.ConversionError, match="model_type is 'bert', expected one of"):
        hf.load_hf_folder(str(path))

    path = _folder(tmp_path)
    _edit_config(path, num_attention_heads=5)
    with pytest.raises(hf.ConversionError, match="num_attention_heads=5 does not divide hidden_size=64"):
        hf.load_hf_folder(str(path))


def test_failed_export_leaves_nothing(tmp_path):
    cfg = model.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                            decoder_window=65)
    params = model.init_params(cfg, jax.random.key(0))
    with pytest.raises(hf.ConversionError, match="decoder_window=65"):
        hf.save_hf_folder(params, cfg, "decoder", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
