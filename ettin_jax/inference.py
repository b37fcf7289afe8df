"""Inference: fill-mask with an encoder, generation with a decoder, and the `ettin fill-mask` / `ettin generate`
commands.

    ettin fill-mask --model=PATH --text="Paris is the [MASK] of France." [--top_k=5] [--json]
    ettin generate --model=PATH --prompt="Once upon a time" [--max_new_tokens=64]
                   [--greedy | --temperature=T --top_p=P --seed=S] [--json]

PATH is a Hugging Face folder (`ettin export`, or a released Ettin checkpoint) or a training workdir (a folder with
`checkpoints/`, read by `ettin_jax.checkpoint.load_model_from_workdir`; of a paired run's two models, fill-mask takes
the encoder and generate the decoder unless --which says otherwise). With --json the last line printed is JSON:
fill-mask a list of {token_id, token_str, score} (a list of such lists when the text holds several masks, as in
transformers' fill-mask pipeline); generate {token_ids, text} (the new tokens only).

Text is encoded as transformers' AutoTokenizer encodes it for ModernBERT (the tokenizer.json post-processor wraps
it as [CLS] ... [SEP]), but with the `tokenizers` library directly, which starts in a fraction of the time. For
generation the trailing [SEP] (the decoder's EOS) is dropped, so the prompt is [CLS] + text and the model continues
the text rather than starting after an end of sequence.

Generation prefills the prompt into the KV cache in one call, then decodes inside one jitted `lax.while_loop` (one
forward of one token per step; a global layer's cache holds prompt + max_new_tokens positions and a sliding-window
layer's only its window, so shapes are fixed and nothing recompiles per token). On CPU, greedy decoding takes the
argmax of the tied decoder's logits from a bf16 copy of the embedding with a rigorous error bound, recomputing in
fp32 only the rows that could hold the maximum (`screened_argmax`: the same token at half the decoder's bytes). On 2
CPU cores, for the 150m decoder (64-token prompt, 256 new tokens, batch 1, fp32) it runs 1.52-1.57x transformers'
`generate` (benchmarks/RESULTS.md; decoding is bound by streaming the fp32 weights once a token: docs/perf.md items
12 and 13).
Greedy decoding takes the argmax, exactly as transformers' greedy `generate`; sampling divides by the temperature,
keeps the smallest set of tokens whose probability reaches top_p (transformers' TopPLogitsWarper), and draws with a
key folded from (seed, step).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from ettin_jax import attention, cli, hf, kernels
from ettin_jax.kernels.cpu import screened_argmax
from ettin_jax.model import Ettin, ModelConfig, init_cache, transpose_for_decoding
from ettin_jax.tokenizer import TextTokenizer

# ----------------------------------------------------------------------------------------------------- loading


def load_model(path: str, which: Optional[str] = None, prefer: Optional[str] = None):
    """(params, ModelConfig, arch, tokenizer_dir or None) from a Hugging Face folder or a training workdir.

    arch is 'encoder' or 'decoder'. A workdir of a paired run holds both: `which` picks one; without it, `prefer`
    is taken if the workdir holds it (the CLI prefers the architecture its subcommand needs). The parameters are put
    on the default device once, here, so that jitted calls do not copy them again.
    """
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a folder: expected a Hugging Face folder (config.json and "
                         "model.safetensors) or a training workdir (with checkpoints/)")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        try:
            from ettin_jax.checkpoint import load_model_from_workdir, load_models
        except ImportError as e:
            raise ValueError(f"{path!r} is a training workdir, but this installation cannot read workdirs "
                             f"(ettin_jax.checkpoint.load_model_from_workdir: {e}); export it with `ettin export` "
                             "and pass the exported folder") from None
        if which is None and prefer is not None and prefer in load_models(path):
            which = prefer
        params, cfg, arch, tokenizer_dir = load_model_from_workdir(path, which)
    elif os.path.isfile(os.path.join(path, "config.json")):
        params, cfg, arch = hf.load_hf_folder(path)
        tokenizer_dir = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
        if which is not None and which != arch:
            raise ValueError(f"{path!r} holds a {arch} ({hf.ARCHITECTURES[arch]['cls']}), not a {which}")
    else:
        raise ValueError(f"{path!r} holds neither config.json (a Hugging Face folder) nor checkpoints/ "
                         "(a training workdir)")
    return jax.device_put(params), cfg, arch, tokenizer_dir


def validate_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Raises ValueError naming the first id outside [0, vocab_size)."""
    for pos, i in enumerate(ids):
        if not 0 <= int(i) < vocab_size:
            raise ValueError(f"token id {int(i)} (position {pos}) is outside the model's vocabulary: ids must be "
                             f"in 0..{vocab_size - 1}")


# --------------------------------------------------------------------------------------------------- fill-mask


def _features(params, cfg: ModelConfig, hidden):
    """The prediction head (`Ettin.head`: dense, GELU, norm): hidden [..., H] -> features [..., H]."""
    return Ettin(cfg).apply({"params": params}, hidden, method=Ettin.head)


def _decode(params, cfg: ModelConfig, features):
    """The tied decoder (`Ettin.decode`): features [..., H] -> fp32 logits [..., V]."""
    return Ettin(cfg).apply({"params": params}, features, method=Ettin.decode)


def predict_logits(params, cfg: ModelConfig, hidden):
    """`Ettin.predict` (hidden [..., H] -> logits [..., V]): the head, then the tied decoder."""
    return Ettin(cfg).apply({"params": params}, hidden, method=Ettin.predict)


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def _fill(params, cfg: ModelConfig, tokens, positions, top_k: int):
    model = Ettin(cfg)
    hidden = model.apply({"params": params}, tokens, mask=attention.BIDIRECTIONAL)
    logits = predict_logits(params, cfg, hidden[0, positions])
    return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)


def fill_mask(params, cfg: ModelConfig, tokenizer: TextTokenizer, text: str, top_k: int = 5):
    """The top_k fills of the mask token in `text`, as transformers' fill-mask pipeline gives them.

    Returns a list of {token_id, token_str, score} (softmax probability over the vocabulary, best first); when the
    text holds several mask tokens, one such list per mask, in text order (each mask scored independently from
    one forward pass).
    """
    if tokenizer.mask_id is None:
        raise ValueError(f"the tokenizer in {tokenizer.folder!r} has no mask token {tokenizer.mask_token!r}")
    ids = tokenizer.encode(text)
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    if not positions:
        raise ValueError(f"no mask token in the text {text!r}: put {tokenizer.mask_token!r} where the word to "
                         f"fill goes, e.g. \"Paris is the {tokenizer.mask_token} of France.\"")
    validate_token_ids(ids, cfg.vocab_size)
    if not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k}; expected 1..{cfg.vocab_size} (the vocabulary size)")
    scores, token_ids = jax.device_get(_fill(params, cfg, jnp.asarray([ids], jnp.int32),
                                             jnp.asarray(positions, jnp.int32), top_k))
    results = [[dict(token_id=int(t), token_str=tokenizer.decode([int(t)]), score=float(s))
                for s, t in zip(row_s, row_t)] for row_s, row_t in zip(scores, token_ids)]
    return results[0] if len(results) == 1 else results


# --------------------------------------------------------------------------------------------------- generation


def encode_prompt(tokenizer: TextTokenizer, text: str) -> list[int]:
    """The decoder's prompt for `text`: the tokenizer's ids without the trailing [SEP] (EOS)."""
    ids = tokenizer.encode(text)
    if ids and tokenizer.sep_id is not None and ids[-1] == tokenizer.sep_id:
        ids = ids[:-1]
    return ids


def _select(features, logits_fn, key, step, greedy, temperature, top_p, screened=None):
    """The next token from the head's features [H]: argmax of the logits, or a draw after temperature and top-p
    filtering.

    greedy, temperature and top_p are traced, so that every decoding mode shares one compilation (`generate`
    compiles greedy decoding apart only where it screens); `lax.cond` runs only the branch taken (no sort for greedy
    decoding or top_p = 1). With `screened` (features -> token or -1; `screened_argmax.argmax`, CPU) the greedy
    token is the screened argmax, which reads the tied decoder's bf16 copy and recomputes only the rows that can
    hold the maximum: the same token, at half the decoder's bytes.
    """
    def nucleus(logits):  # keep t iff the tokens more probable than t hold < top_p of the mass (the best stays)
        sorted_logits = jnp.sort(logits)[::-1]
        probs = jax.nn.softmax(sorted_logits)
        threshold = jnp.min(jnp.where(jnp.cumsum(probs) - probs < top_p, sorted_logits, jnp.inf))
        return jnp.where(logits >= threshold, logits, -jnp.inf)

    def sample(features):
        logits = logits_fn(features) / temperature
        logits = jax.lax.cond(top_p < 1, nucleus, lambda x: x, logits)
        return jax.random.categorical(jax.random.fold_in(key, step), logits).astype(jnp.int32)

    def best(features):
        plain = lambda f: jnp.argmax(logits_fn(f)).astype(jnp.int32)
        if screened is None:
            return plain(features)
        token = screened(features)
        return jax.lax.cond(token >= 0, lambda f: token, plain, features)  # -1: a value not finite

    return jax.lax.cond(greedy, best, sample, features)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "screen"))
def _generate(params, cfg: ModelConfig, prompt, key, greedy, temperature, top_p, eos_id, *, max_new_tokens: int,
              screen: bool = False):
    """prompt [1, P] -> (tokens [max_new_tokens], count): prefill once, then one token per loop step."""
    model = Ettin(cfg)
    screened = None
    if screen:
        embedding, bias = params["tok_embeddings"]["embedding"], params["decoder_bias"]
        prepared = screened_argmax.prepare(embedding)
        screened = lambda features: screened_argmax.argmax(features, embedding, bias, prepared)[0]
    select = functools.partial(_select, logits_fn=functools.partial(_decode, params, cfg), key=key, greedy=greedy,
                               temperature=temperature, top_p=top_p, screened=screened)

    # CPU only: XLA:CPU streams the transposed Wo kernels faster (measured there); elsewhere the copy costs memory
    decoding = transpose_for_decoding(params) if kernels.platform() == "cpu" else params

    def forward(tokens, cache):
        hidden, cache = model.apply({"params": decoding}, tokens, mask=attention.CAUSAL, cache=cache)
        return _features(params, cfg, hidden[0, -1]), cache

    cache = init_cache(cfg, 1, prompt.shape[1] + max_new_tokens, dtype=jnp.dtype(cfg.dtype))
    features, cache = forward(prompt, cache)
    first = select(features, step=0)
    out = jnp.zeros((max_new_tokens,), jnp.int32).at[0].set(first)

    def cond(state):
        step, token, _, _ = state
        return (step < max_new_tokens) & (token != eos_id)

    def body(state):
        step, token, cache, out = state
        features, cache = forward(token[None, None], cache)
        token = select(features, step=step)
        return step + 1, token, cache, out.at[step].set(token)

    count, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, out))
    return out, count


def generate(params, cfg: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int, *, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             eos_id: Optional[int] = None, screen: bool = True) -> list[int]:
    """Continues `prompt_ids` with the causal model; returns the new token ids (ending with eos_id if it came).

    Greedy output equals transformers' greedy `generate` on the same input_ids. Sampling (greedy=False) divides the
    logits by `temperature`, keeps the top_p nucleus, and draws with keys folded from (seed, step).
    """
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token (the tokenizer's [CLS] starts a prompt)")
    validate_token_ids(prompt_ids, cfg.vocab_size)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 0")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature}; expected > 0 (or greedy decoding)")
    if not greedy and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}; expected 0 < top_p <= 1")
    if max_new_tokens == 0:
        return []
    out, count = _generate(
        params, cfg, jnp.asarray([prompt_ids], jnp.int32), jax.random.key(seed), jnp.bool_(greedy),
        jnp.float32(temperature), jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id),
        max_new_tokens=max_new_tokens, screen=screen and greedy and cfg.dtype == "float32"
        and params["tok_embeddings"]["embedding"].dtype == jnp.float32 and screened_argmax.available())
    return [int(t) for t in np.asarray(out)[:int(count)]]


# ------------------------------------------------------------------------------------------------ command line

DEFAULT_MAX_NEW_TOKENS = 64  # also an exported decoder's generation_config.json max_new_tokens (ettin_jax/hf.py)
def define_flags(subcommand: str) -> flags.FlagValues:
    """The flags of `ettin fill-mask` / `ettin generate`, in a private registry made when the command runs."""
    fv = flags.FlagValues()
    flags.DEFINE_string("model", None, "Hugging Face folder or training workdir", flag_values=fv)
    flags.DEFINE_enum("which", None, list(hf.ARCHITECTURES), "the model of a paired workdir (default: the "
                      "encoder for fill-mask, the decoder for generate)", flag_values=fv)
    flags.DEFINE_boolean("json", False, "print the result as JSON on the last line", flag_values=fv)
    if subcommand == "fill-mask":
        flags.DEFINE_string("text", None, "text holding the tokenizer's mask token, e.g. [MASK]", flag_values=fv)
        flags.DEFINE_integer("top_k", 5, "number of fills per mask", flag_values=fv)
        return fv
    flags.DEFINE_string("prompt", None, "text to continue", flag_values=fv)
    flags.DEFINE_list("prompt_ids", None, "token ids to continue instead of --prompt (comma-separated)",
                      flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", DEFAULT_MAX_NEW_TOKENS, "tokens to generate at most (stops earlier at EOS)",
                         flag_values=fv)
    flags.DEFINE_boolean("greedy", None, "argmax decoding (the default unless a sampling flag is given)",
                         flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "sampling temperature", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "sampling nucleus mass", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
    return fv


USAGE = {
    "fill-mask": "--model=PATH [--which=encoder] --text=TEXT [--top_k=5] [--json]",
    "generate": "--model=PATH [--which=decoder] (--prompt=TEXT | --prompt_ids=I,J,...) "
                "[--max_new_tokens=N] "
                "[--greedy | --temperature=T --top_p=P --seed=S] [--json]",
}


def _sampling_flags(fv) -> list[str]:
    return [n for n in ("temperature", "top_p", "seed") if fv[n].present]


def _check_flags(subcommand: str, fv) -> None:
    """Flag errors that need no model, raised before loading one."""
    if not fv.model:
        raise ValueError("--model is required")
    if subcommand == "fill-mask" and fv.text is None:
        raise ValueError("--text is required")
    if subcommand == "generate":
        if (fv.prompt is None) == (fv.prompt_ids is None):
            raise ValueError("give exactly one of --prompt and --prompt_ids")
        if fv.greedy and _sampling_flags(fv):
            raise ValueError(f"--greedy conflicts with --{', --'.join(_sampling_flags(fv))}; drop one")


def _run_fill_mask(fv, params, cfg, arch, tokenizer) -> str:
    if arch != "encoder":
        raise ValueError(f"{fv.model!r} is a {arch}; fill-mask needs an encoder (use `ettin generate` for a "
                         "decoder)")
    result = fill_mask(params, cfg, tokenizer, fv.text, top_k=fv.top_k)
    rows = [result] if result and isinstance(result[0], dict) else result
    for n, row in enumerate(rows):
        if len(rows) > 1:
            print(f"mask {n + 1} of {len(rows)}:")
        for r in row:
            print(f"  {r['score']:.4f}  {r['token_str']!r}  (id {r['token_id']})")
    return json.dumps(result)


def _run_generate(fv, params, cfg, arch, tokenizer) -> str:
    if arch != "decoder":
        raise ValueError(f"{fv.model!r} is an {arch} (bidirectional attention), which cannot generate text: use "
                         "`ettin fill-mask` with it, or pass a decoder (or a cross-objective model exported as a "
                         "decoder)")
    greedy = fv.greedy if fv.greedy is not None else not _sampling_flags(fv)
    if fv.prompt_ids is not None:
        try:
            ids = [int(i) for i in fv.prompt_ids]
        except ValueError:
            raise ValueError(f"--prompt_ids={','.join(fv.prompt_ids)} is not a list of integers") from None
    elif tokenizer is None:
        raise ValueError(f"no tokenizer.json beside the model in {fv.model!r}: pass --prompt_ids instead")
    else:
        ids = encode_prompt(tokenizer, fv.prompt)
    start = time.perf_counter()
    new = generate(params, cfg, ids, fv.max_new_tokens, greedy=greedy, temperature=fv.temperature,
                   top_p=fv.top_p, seed=fv.seed, eos_id=cfg.sep_token_id)
    seconds = time.perf_counter() - start
    text = None if tokenizer is None else tokenizer.decode(new, skip_special_tokens=True)
    if tokenizer is not None:  # decoded as one sequence: a character may span the prompt's last token and the next
        print(tokenizer.decode(ids + new, skip_special_tokens=True))
    else:
        print(" ".join(map(str, new)))
    print(f"[{len(new)} new tokens in {seconds:.2f} s, compilation included]")
    return json.dumps(dict(token_ids=new, text=text))


def main(argv: list[str], subcommand: str = "generate") -> int:
    """`ettin fill-mask ...` / `ettin generate ...`; returns the exit status. Bad input is one line on stderr and
    exit status 2."""
    prog = argv[0] if argv else f"ettin {subcommand}"
    if subcommand not in USAGE:
        print(f"{prog}: error: unknown subcommand {subcommand!r}; expected one of {', '.join(USAGE)}",
              file=sys.stderr)
        return 2
    fv = define_flags(subcommand)
    rest = cli.parse_flags(fv, argv, USAGE[subcommand])
    if isinstance(rest, int):
        return rest
    try:
        _check_flags(subcommand, fv)
        params, cfg, arch, tokenizer_dir = load_model(
            fv.model, which=fv.which, prefer="encoder" if subcommand == "fill-mask" else "decoder")
        tokenizer = TextTokenizer(tokenizer_dir) if tokenizer_dir else None
        if subcommand == "fill-mask":
            if tokenizer is None:
                raise ValueError(f"no tokenizer.json beside the model in {fv.model!r}; fill-mask needs one")
            line = _run_fill_mask(fv, params, cfg, arch, tokenizer)
        else:
            line = _run_generate(fv, params, cfg, arch, tokenizer)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {cli.user_error(e) or e}", file=sys.stderr)
        return 2
    if fv.json:
        print(line)
    return 0
