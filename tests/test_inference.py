"""Tests for ettin_jax.inference against transformers on tiny random models built here (no downloads).

A byte-level BPE tokenizer in ModernBERT's format ([CLS] $A [SEP], [MASK] absorbing the space before it) is trained
on a few sentences; a ModernBertForMaskedLM and a ModernBertDecoderForCausalLM with large random weights (so that
the logits are far from uniform) and a small local window (so that the generated sequences cross several windows)
are saved with save_pretrained and read back with `inference.load_model`.
"""
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ettin_jax import attention, inference
from ettin_jax import tokenizer as tokenizer_lib
from ettin_jax.kernels.cpu import screened_argmax
from ettin_jax.model import Ettin, init_cache

SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
TEXTS = ["The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Rome of Italy.",
         "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in "
         "want of a wife."]
LOCAL_ATTENTION = 16  # decoder local layers see 8 keys: 40+ token sequences cross several windows
PROMPT = "Zebras quietly juggle vivid hexagons beneath a wintry sky"  # little of it merged: 40+ tokens


def _make_tokenizer(out: str) -> str:
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False, lstrip=(t == "[MASK]")) for t in SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True,
              "model_max_length": 8192, **{f"{t[1:-1].lower()}_token": t for t in SPECIALS}}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return out


def _hf_model(arch: str, vocab_size: int):
    import transformers
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, local_attention=LOCAL_ATTENTION, initializer_range=0.3,
                  pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                  max_position_embeddings=512)
    torch.manual_seed(0 if arch == "encoder" else 1)
    if arch == "encoder":
        model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**common))
    else:
        model = transformers.ModernBertDecoderForCausalLM(transformers.ModernBertDecoderConfig(**common))
    with torch.no_grad():
        model.decoder.bias.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    tok_dir = _make_tokenizer(str(root / "tokenizer"))
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    out = {}
    for arch in ("encoder", "decoder"):
        model = _hf_model(arch, len(hf_tok))
        model.save_pretrained(root / arch)
        hf_tok.save_pretrained(root / arch)
        out[arch] = str(root / arch)
    return out


@pytest.fixture(scope="module")
def decoder(folders):
    return inference.load_model(folders["decoder"])


BUNDLED_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "data", "tokenizer")


@pytest.mark.parametrize("which", ["test", "bundled"])
def test_tokenizer_matches_autotokenizer(folders, which):
    from transformers import AutoTokenizer
    folder = folders["encoder"] if which == "test" else BUNDLED_TOKENIZER
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        pytest.skip(f"no tokenizer in {folder}")
    hf_tok = AutoTokenizer.from_pretrained(folder)
    ours = tokenizer_lib.TextTokenizer(folder)
    for text in ["Paris is the [MASK] of France.", "The quick [MASK] fox[MASK] jumps", PROMPT, "naïve ünïcode 🙂",
                 "def f(x):\n    return x  # [CLS] inside [SEP]", "  spaces  and\ttabs "]:
        ids = hf_tok(text)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids) == hf_tok.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
        assert [ours.decode([i]) for i in ids] == [hf_tok.decode([i]) for i in ids]
    assert (ours.mask_id, ours.mask_token) == (hf_tok.mask_token_id, hf_tok.mask_token)
    assert (ours.cls_id, ours.sep_id) == (hf_tok.cls_token_id, hf_tok.sep_token_id)


@pytest.mark.parametrize("text", ["Paris is the [MASK] of France.", "The quick [MASK] fox jumps over[MASK] dog."])
def test_fill_mask_matches_pipeline(folders, text):
    import transformers
    pipe = transformers.pipeline("fill-mask", model=folders["encoder"], tokenizer=folders["encoder"],
                                 device="cpu")
    params, cfg, arch, tok_dir = inference.load_model(folders["encoder"])
    assert arch == "encoder" and tok_dir == folders["encoder"]
    ours = inference.fill_mask(params, cfg, tokenizer_lib.TextTokenizer(tok_dir), text, top_k=7)
    theirs = pipe(text, top_k=7)
    if isinstance(theirs[0], dict):  # one mask: a flat list, as the pipeline returns it
        ours, theirs = [ours], [theirs]
    assert len(ours) == len(theirs)
    for row_ours, row_theirs in zip(ours, theirs):
        assert [r["token_id"] for r in row_ours] == [r["token"] for r in row_theirs]
        assert [r["token_str"] for r in row_ours] == [r["token_str"] for r in row_theirs]
        np.testing.assert_allclose([r["score"] for r in row_ours], [r["score"] for r in row_theirs], atol=1e-5)


def _hf_greedy(folder, ids, n):
    import transformers
    model = transformers.ModernBertDecoderForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=3)
    return out[0, len(ids):].tolist()


def test_greedy_generation_matches_transformers(folders, decoder):
    params, cfg, arch, tok_dir = decoder
    assert arch == "decoder"
    ids = inference.encode_prompt(tokenizer_lib.TextTokenizer(tok_dir), PROMPT)
    assert ids[0] == 1 and ids[-1] != 2 and len(ids) > LOCAL_ATTENTION  # [CLS] text, the [SEP] dropped
    ours = inference.generate(params, cfg, ids, 32)
    assert ours == _hf_greedy(folders["decoder"], ids, 32)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler (g++) to build the handler")
@pytest.mark.slow
def test_greedy_generation_screened_equals_the_plain_product(decoder):
    """On CPU greedy decoding takes the token from `screened_argmax` (the tied decoder's bf16 copy, exact fp32
    rows where needed): the same tokens as the plain fp32 product, and the compiled loop calls the handler."""
    params, cfg, _, _ = decoder
    assert screened_argmax.available()
    ids = [1, 40, 50, 60, 70]
    assert inference.generate(params, cfg, ids, 40) == inference.generate(params, cfg, ids, 40, screen=False)
    text = _greedy_generate_hlo(params, cfg, ids, 8, screen=True)
    assert text.count(f'custom_call_target="{screened_argmax.TARGET}"') == 2  # the first token and the loop's


def test_generation_stops_at_eos(decoder):
    params, cfg, _, _ = decoder
    ids = [1, 40, 50, 60]
    free = inference.generate(params, cfg, ids, 16)
    eos = free[5]
    stop = free.index(eos)
    assert inference.generate(params, cfg, ids, 16, eos_id=eos) == free[:stop + 1]


@pytest.mark.slow
def test_kv_cache_decoding_matches_full_forward(decoder):
    """Logits of a prefill plus single-token steps equal one causal forward over the whole sequence."""
    params, cfg, _, _ = decoder
    model = Ettin(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 5, cfg.vocab_size)
    full = model.apply({"params": params},
                       model.apply({"params": params}, tokens, mask=attention.CAUSAL), method=Ettin.predict)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, mask=attention.CAUSAL, cache=c))
    cache = init_cache(cfg, 2, 40)
    hidden, cache = step(params, tokens[:, :9], cache)
    pieces = [hidden]
    for i in range(9, 40):
        hidden, cache = step(params, tokens[:, i:i + 1], cache)
        pieces.append(hidden)
    cached = model.apply({"params": params}, jnp.concatenate(pieces, 1), method=Ettin.predict)
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)
    assert int(cache["index"]) == 40


def _greedy_generate_hlo(params, cfg, prompt_ids, new, **static) -> str:
    """The compiled HLO text of greedy `inference._generate` (`static`: its static arguments besides the length)."""
    return inference._generate.lower(
        params, cfg, jnp.asarray([prompt_ids], jnp.int32), jax.random.key(0), jnp.bool_(True), jnp.float32(1),
        jnp.float32(1), jnp.int32(-1), max_new_tokens=new, **static).compile().as_text()


def _decoding_loop_hlo(text: str) -> str:
    """The HLO text of the decoding `while` loop's body and every computation it calls (fusions, nested loops)."""
    comps = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.M | re.S))
    entry = text[text.index("\nENTRY"):]
    bodies = [b for b in re.findall(r"body=%?([\w.\-]+)", entry) if "f32[" in comps.get(b, "")]
    seen, todo = set(), list(bodies)
    while todo:
        name = todo.pop()
        if name not in seen and name in comps:
            seen.add(name)
            todo += re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", comps[name])
    return "\n".join(comps[n] for n in seen)


@pytest.mark.slow
def test_decoding_loop_updates_the_kv_cache_in_place(decoder):
    """The compiled decoding loop never copies or transposes a layer's KV cache (global or ring): each token's keys
    and values are written in place and read where they lie (a [B, S, H, D] cache was transposed, and a [B, H, S, D]
    one copied three times, every token: a fifth of the 150m model's decoding time on CPU)."""
    params, cfg, _, _ = decoder
    prompt, new = 5, 11
    text = _greedy_generate_hlo(params, cfg, [1] * prompt, new)
    # a global layer's cache holds prompt + new slots, a sliding-window layer's ring only its window
    sizes = {c["k"].size for c in init_cache(cfg, 1, prompt + new)["layers"]}
    assert len(sizes) == 2, sizes
    made = [(name, op) for name, dims, op in re.findall(r"%(\S+) = f32\[([\d,]*)\]\S* ([\w-]+)\(",
                                                        _decoding_loop_hlo(text))
            if dims and np.prod([int(n) for n in dims.split(",")]) in sizes
            and op not in ("parameter", "get-tuple-element", "bitcast", "tuple")]
    writes = [(name, op) for name, op in made if "dynamic-update-slice" in name or op == "dynamic-update-slice"]
    assert writes, "no write of the cache found in the decoding loop: update this test"
    assert len(made) == len(writes), f"the decoding loop makes cache-sized arrays: {sorted(set(made) - set(writes))}"


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(decoder):
    params, cfg, _, _ = decoder
    ids = [1, 40, 50, 60]
    a = inference.generate(params, cfg, ids, 16, greedy=False, temperature=1.5, seed=3)
    assert a == inference.generate(params, cfg, ids, 16, greedy=False, temperature=1.5, seed=3)
    assert a != inference.generate(params, cfg, ids, 16, greedy=False, temperature=1.5, seed=4)
    # A nucleus smaller than the best token's probability keeps only the best token.
    assert inference.generate(params, cfg, ids, 16, greedy=False, top_p=1e-6, seed=5) == \
        inference.generate(params, cfg, ids, 16)


def test_validate_token_ids():
    inference.validate_token_ids([0, 5, 9], 10)
    with pytest.raises(ValueError, match="token id 10 "):
        inference.validate_token_ids([0, 10, 12], 10)
    with pytest.raises(ValueError, match="token id -1 "):
        inference.validate_token_ids([-1], 10)


def _cli(capsys, subcommand, *args):
    code = inference.main([f"ettin {subcommand}", *args], subcommand=subcommand)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_equals_library(folders, decoder, capsys):
    enc = folders["encoder"]
    code, out, err = _cli(capsys, "fill-mask", f"--model={enc}", "--text=Paris is the [MASK] of France.",
                          "--top_k=3", "--json")
    assert code == 0, err
    params, cfg, _, tok_dir = inference.load_model(enc)
    expected = inference.fill_mask(params, cfg, tokenizer_lib.TextTokenizer(tok_dir), "Paris is the [MASK] of France.", 3)
    assert json.loads(out.strip().splitlines()[-1]) == pytest.approx(expected)

    params, cfg, _, tok_dir = decoder
    tok = tokenizer_lib.TextTokenizer(tok_dir)
    code, out, err = _cli(capsys, "generate", f"--model={folders['decoder']}", f"--prompt={PROMPT}",
                          "--max_new_tokens=32", "--json")
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    new = inference.generate(params, cfg, inference.encode_prompt(tok, PROMPT), 32, eos_id=cfg.sep_token_id)
    assert got == {"token_ids": new, "text": tok.decode(new, skip_special_tokens=True)}

    code, out, err = _cli(capsys, "generate", f"--model={folders['decoder']}", "--prompt_ids=1,40,50,60",
                          "--max_new_tokens=16", "--temperature=0.7", "--top_p=0.9", "--seed=1", "--json")
    assert code == 0, err
    new = inference.generate(params, cfg, [1, 40, 50, 60], 16, greedy=False, temperature=0.7, top_p=0.9, seed=1,
                             eos_id=cfg.sep_token_id)
    assert json.loads(out.strip().splitlines()[-1])["token_ids"] == new


@pytest.mark.parametrize("subcommand,args,needle", [
    ("fill-mask", ["--text=Paris is the capital of France."], "put '[MASK]'"),
    ("generate", ["--prompt=Hello"], "use `ettin fill-mask`"),
])
def test_cli_bad_input_on_encoder(folders, capsys, subcommand, args, needle):
    code, out, err = _cli(capsys, subcommand, f"--model={folders['encoder']}", *args)
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_out_of_vocabulary_ids(folders, capsys):
    code, _, err = _cli(capsys, "generate", f"--model={folders['decoder']}", "--prompt_ids=1,5,100000")
    assert code == 2 and "token id 100000" in err and len(err.strip().splitlines()) == 1


def test_cli_usage_errors(folders, tmp_path, capsys):
    code, _, err = _cli(capsys, "generate", f"--model={folders['decoder']}", "--prompt=a", "--greedy",
                        "--temperature=0.5")
    assert code == 2 and "--greedy conflicts with --temperature" in err
    code, _, err = _cli(capsys, "fill-mask", f"--model={tmp_path}", "--text=[MASK]")
    assert code == 2 and "neither config.json" in err
    code, _, err = _cli(capsys, "fill-mask", f"--model={folders['decoder']}", "--text=[MASK]")
    assert code == 2 and "use `ettin generate`" in err


@pytest.mark.slow
def test_workdir_models(folders, tmp_path, capsys):
    """A paired run's workdir: fill-mask takes its encoder, generate its decoder, as from the HF folders."""
    from ettin_jax import checkpoint
    loaded = {arch: inference.load_model(folders[arch]) for arch in ("encoder", "decoder")}
    workdir = str(tmp_path / "run")
    checkpoint.save_models(workdir, {arch: cfg for arch, (_, cfg, _, _) in loaded.items()})
    ckpt = checkpoint.Checkpoints(workdir, async_save=False)
    ckpt.save(7, params={arch: p for arch, (p, _, _, _) in loaded.items()}, meta={"step": 7})
    ckpt.close()
    checkpoint.copy_tokenizer(folders["encoder"], workdir)
    for subcommand, arg in (("fill-mask", "--text=Paris is the [MASK] of France."), ("generate", f"--prompt={PROMPT}")):
        lines = []
        for model in (workdir, folders["encoder" if subcommand == "fill-mask" else "decoder"]):
            code, out, err = _cli(capsys, subcommand, f"--model={model}", arg, "--json")
            assert code == 0, err
            lines.append(json.loads(out.strip().splitlines()[-1]))
        assert lines[0] == pytest.approx(lines[1])
    code, _, err = _cli(capsys, "generate", f"--model={workdir}", "--which=encoder", "--prompt=a")
    assert code == 2 and "use `ettin fill-mask`" in err


def test_workdir_without_checkpoint_module(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "checkpoints")
    monkeypatch.setitem(__import__("sys").modules, "ettin_jax.checkpoint", None)  # import fails
    with pytest.raises(ValueError, match="cannot read workdirs.*ettin export"):
        inference.load_model(str(tmp_path))
