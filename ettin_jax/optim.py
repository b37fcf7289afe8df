"""Ettin's optimizer (StableAdamW) and its learning-rate and batch-size schedules.

StableAdamW is written out in the reference (section 3); per tensor, at 1-based step t:

    b1_t = (b1^t - b1) / (b1^t - 1);  b2_t likewise        (bias correction folded into the betas)
    m = b1_t * m + (1 - b1_t) * g
    v = b2_t * v + (1 - b2_t) * g^2
    rms  = sqrt(mean(g^2 / max(v, eps^2)))                  (per-tensor update clipping)
    lr_t = lr / max(1, rms)
    p = p * (1 - (lr_t / max_lr) * wd)                      (weight decay not multiplied by the LR)
    p = p - lr_t * m / (sqrt(v) + eps)

`stable_adamw` returns it as an optax transformation whose updates are additive (`optax.apply_updates`). Ettin
counts LR time in non-pad tokens, not steps, so the schedules here are functions of a token count; the trainer wraps
the optimizer in `optax.inject_hyperparams` (`injectable_stable_adamw` does this) and writes the LR for the tokens
seen so far into the state before each update (`set_learning_rate`). The last per-tensor `rms` is kept in the state so
the trainer can log it (`update_rms`, `mean_update_rms`).
"""
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[Any], jax.Array]


# ---------------------------------------------------------------------------------------------------------------------
# StableAdamW
# ---------------------------------------------------------------------------------------------------------------------


class StableAdamWState(NamedTuple):
    """State of `stable_adamw`; every float in it is fp32 whatever the parameters' dtype.

    count: int32 number of updates applied so far (t - 1 during the next update).
    mu, nu: first and second moments, shaped like the parameters.
    rms: per-tensor fp32 scalar, sqrt(mean(g^2 / max(v, eps^2))) of the last update (0 before the first); the LR of a
        tensor was divided by it where it exceeded 1, so it is the "update RMS" to log.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    rms: optax.Updates


def decay_mask(params: optax.Params) -> Any:
    """Ettin's weight-decay mask: True (decay) for tensors with ndim > 1, False for norms and biases (ndim <= 1)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _bias_corrected_beta(beta: jax.Array, t: jax.Array) -> jax.Array:
    """(beta^t - beta) / (beta^t - 1), computed without cancellation.

    Both differences are of numbers near 1, which in fp32 loses about 1e-6 relative accuracy at small t; written with
    expm1 (beta^t - beta = beta * expm1((t-1) log beta), beta^t - 1 = expm1(t log beta)) it is exact to rounding, and
    exactly 0 at t = 1 (so the first m is g and the first v is g^2).
    """
    log_beta = jnp.log(beta)
    return beta * jnp.expm1((t - 1.0) * log_beta) / jnp.expm1(t * log_beta)


def _check_positive(name: str, value: Any) -> None:
    # Only Python numbers can be checked here: under inject_hyperparams the values arrive as (possibly traced) arrays.
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"stable_adamw: {name} must be > 0, got {value!r}")


def stable_adamw(
    learning_rate: Union[float, jax.Array, optax.Schedule],
    *,
    max_learning_rate: Union[float, jax.Array],
    b1: Union[float, jax.Array] = 0.9,
    b2: Union[float, jax.Array] = 0.98,
    eps: Union[float, jax.Array] = 1e-6,
    weight_decay: Union[float, jax.Array] = 0.0,
    weight_decay_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformation:
    """StableAdamW exactly as the reference writes it (see the module docstring), as an additive optax update.

    Args:
      learning_rate: the LR, or an optax schedule of the update count (0 on the first update). Ettin's LR is a
        function of tokens, not steps: wrap with `optax.inject_hyperparams` (see `injectable_stable_adamw`) and set it
        per step with `set_learning_rate`.
      max_learning_rate: the phase's peak LR; weight decay is scaled by lr_t / max_learning_rate, not by the LR.
      b1, b2, eps: Adam constants (Ettin: 0.9, 0.98, 1e-6).
      weight_decay: decoupled weight decay (Ettin: 3e-4 for 17m-68m, 1e-5 for 150m and 400m, 5e-5 for 1b).
      weight_decay_mask: pytree of bools like the params (True = decay), or a function params -> such a pytree;
        None means `decay_mask` (decay ndim > 1 only). Pass it in `static_args` under inject_hyperparams when it is a
        function, or optax would treat it as a schedule.

    Returns:
      A GradientTransformation whose `update(grads, state, params)` needs params (for the decay) and returns
      updates = -(lr_t / max_lr) * wd * mask * p - lr_t * m / (sqrt(v) + eps), cast to each param's dtype.
    """
    for name, value in (("max_learning_rate", max_learning_rate), ("eps", eps)):
        _check_positive(name, value)
    for name, beta in (("b1", b1), ("b2", b2)):
        # b = 0 would make the folded bias correction 0/0 at every step.
        if isinstance(beta, (int, float)) and not 0.0 < beta < 1.0:
            raise ValueError(f"stable_adamw: {name} must be in (0, 1), got {beta!r}")
    if isinstance(weight_decay, (int, float)) and weight_decay < 0:
        raise ValueError(f"stable_adamw: weight_decay must be >= 0, got {weight_decay!r}")

    def init_fn(params):
        # fp32 moments even for bf16 params; zeros_like keeps each parameter's sharding (FSDP shards the moments).
        zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)
        return StableAdamWState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
            rms=jax.tree.map(lambda p: jnp.zeros([], jnp.float32), params),
        )

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError("stable_adamw: update() needs params (weight decay is applied to them); "
                             "call tx.update(grads, opt_state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        lr, max_lr, wd, eps_ = f32(lr), f32(max_learning_rate), f32(weight_decay), f32(eps)
        t = f32(state.count + 1)
        b1_t, b2_t = _bias_corrected_beta(f32(b1), t), _bias_corrected_beta(f32(b2), t)

        if weight_decay_mask is None:
            mask = decay_mask(params)
        elif callable(weight_decay_mask):
            mask = weight_decay_mask(params)
        else:
            mask = weight_decay_mask

        def per_tensor(g, m, v, p, decay):
            g = f32(g)
            m = b1_t * m + (1.0 - b1_t) * g
            v = b2_t * v + (1.0 - b2_t) * g * g
            rms = jnp.sqrt(jnp.mean(g * g / jnp.maximum(v, eps_ * eps_)))
            lr_t = lr / jnp.maximum(1.0, rms)
            decay_step = (lr_t / max_lr) * (wd * f32(decay)) * f32(p)
            update = -(decay_step + lr_t * m / (jnp.sqrt(v) + eps_))
            return update.astype(jnp.result_type(p)), m, v, rms

        out = jax.tree.map(per_tensor, grads, state.mu, state.nu, params, mask)
        # Unzip the per-leaf 4-tuples back into four trees shaped like the grads.
        treedef = jax.tree.structure(grads)
        updates, mu, nu, rms = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out)))
        return updates, StableAdamWState(count=optax.safe_increment(state.count), mu=mu, nu=nu, rms=rms)

    return optax.GradientTransformation(init_fn, update_fn)


def injectable_stable_adamw(
    *,
    max_learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformationExtraArgs:
    """`stable_adamw` under `optax.inject_hyperparams`, its LR starting at 0 and set per step by `set_learning_rate`.

    Same as `optax.inject_hyperparams(stable_adamw, static_args=('weight_decay_mask',),
    hyperparam_dtype=jnp.float32)(learning_rate=0.0, ...)`. The fp32 hyperparam dtype matters: by default optax
    stores hyperparameters in the params' dtype, and b2 = 0.98 in bf16 is 0.98046875.
    """
    # Build once with the Python values so bad ones fail here; inside inject_hyperparams they arrive as arrays.
    stable_adamw(0.0, max_learning_rate=max_learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.inject_hyperparams(stable_adamw, static_args=("weight_decay_mask",), hyperparam_dtype=jnp.float32)(
        learning_rate=0.0,
        max_learning_rate=max_learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
    )


def set_learning_rate(opt_state: optax.OptState, learning_rate: Any) -> optax.OptState:
    """A copy of an inject_hyperparams state with its 'learning_rate' set; pure, so usable inside a jitted step.

    Keeps the stored dtype so a scan or jit carry keeps its type.
    """
    hyperparams = getattr(opt_state, "hyperparams", None)
    if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
        raise ValueError(f"set_learning_rate: expected the state of an optax.inject_hyperparams optimizer with a "
                         f"'learning_rate' hyperparameter (see injectable_stable_adamw), "
                         f"got {type(opt_state).__name__}")
    old = hyperparams["learning_rate"]
    new = jnp.asarray(learning_rate, dtype=jnp.result_type(old)).reshape(jnp.shape(old))
    return opt_state._replace(hyperparams={**hyperparams, "learning_rate": new})


def _stable_adamw_state(opt_state: optax.OptState) -> StableAdamWState:
    is_state = lambda x: isinstance(x, StableAdamWState)
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one StableAdamWState inside the optimizer state, found {len(found)}")
    return found[0]


def update_rms(opt_state: optax.OptState) -> Any:
    """The per-tensor update RMS of the last step (pytree of fp32 scalars like the params) from any optimizer state
    that contains one StableAdamWState (bare, inside inject_hyperparams, or inside a chain). Values > 1 were clipped.
    """
    return _stable_adamw_state(opt_state).rms


def mean_update_rms(opt_state: optax.OptState) -> jax.Array:
    """The mean over tensors of `update_rms(opt_state)`: one scalar to log per step."""
    return jnp.mean(jnp.stack(jax.tree.leaves(update_rms(opt_state))))


# ---------------------------------------------------------------------------------------------------------------------
# Schedules: functions of the number of non-pad tokens seen
# ---------------------------------------------------------------------------------------------------------------------
#
# Token counts reach 1.7e12, past int32, so every schedule converts its argument to fp32 (relative error 6e-8, far
# below anything the LR cares about). Python ints, numpy int64 and jnp float/int scalars are all accepted.


def _tokens(tokens: Any) -> jax.Array:
    return jnp.asarray(tokens, jnp.float32)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def warmup_constant(peak: float, warmup_tokens: float) -> Schedule:
    """Phase 1: LR rises linearly from 0 to `peak` over `warmup_tokens`, then stays at `peak`."""
    _require(peak >= 0, f"warmup_constant: peak must be >= 0, got {peak!r}")
    _require(warmup_tokens >= 0, f"warmup_constant: warmup_tokens must be >= 0, got {warmup_tokens!r}")

    def schedule(tokens):
        t = _tokens(tokens)
        if warmup_tokens == 0:
            return jnp.full_like(t, peak)
        return peak * jnp.clip(t / warmup_tokens, 0.0, 1.0)

    return schedule


def one_minus_sqrt(peak: float, total_tokens: float, start_frac: float, end_frac: float) -> Schedule:
    """Phases 2 and 3: lr(t) = peak * (end + (start - end) * (1 - sqrt(t / T))), held at end * peak after T.

    With start_frac=1, end_frac=a this is the reference's peak * (a + (1 - a)(1 - sqrt(t/T))); Ettin uses
    (1.0, 0.5) for context extension and (0.5, 0.02) for the decay phase, so the two join continuously.
    """
    _require(total_tokens > 0, f"one_minus_sqrt: total_tokens must be > 0, got {total_tokens!r}")

    def schedule(tokens):
        frac = jnp.clip(_tokens(tokens) / total_tokens, 0.0, 1.0)
        return peak * (end_frac + (start_frac - end_frac) * (1.0 - jnp.sqrt(frac)))

    return schedule


def warmup_stable_decay(
    peak: float, warmup_tokens: float, total_tokens: float, decay_tokens: float, final_frac: float
) -> Schedule:
    """Cross-objective runs: linear warmup from 0 over `warmup_tokens`, constant `peak`, then linear decay over the
    last `decay_tokens` (ending at `total_tokens`) to `final_frac * peak`, held there after (Ettin: 3B, 10B, 0.02).
    """
    _require(warmup_tokens >= 0 and decay_tokens >= 0,
             f"warmup_stable_decay: warmup_tokens and decay_tokens must be >= 0, got {warmup_tokens!r}, "
             f"{decay_tokens!r}")
    _require(warmup_tokens + decay_tokens <= total_tokens,
             f"warmup_stable_decay: warmup_tokens + decay_tokens = {warmup_tokens + decay_tokens!r} exceeds "
             f"total_tokens = {total_tokens!r}")
    decay_start = total_tokens - decay_tokens

    def schedule(tokens):
        t = _tokens(tokens)
        warm = jnp.clip(t / warmup_tokens, 0.0, 1.0) if warmup_tokens > 0 else jnp.ones_like(t)
        done = jnp.clip((t - decay_start) / decay_tokens, 0.0, 1.0) if decay_tokens > 0 else (t >= total_tokens)
        return peak * warm * (1.0 - (1.0 - final_frac) * done)

    return schedule


SCHEDULES = {
    "warmup_constant": warmup_constant,
    "one_minus_sqrt": one_minus_sqrt,
    "warmup_stable_decay": warmup_stable_decay,
}


def make_schedule(name: str, **kwargs) -> Schedule:
    """The schedule a config names ('warmup_constant', 'one_minus_sqrt', 'warmup_stable_decay'), built from kwargs."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {name!r}; expected one of {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](**kwargs)


def batch_size_warmup(tokens: Any, *, start: int, end: int, warmup_tokens: float) -> jax.Array:
    """Ettin's (ModernBERT's) batch-size warmup: the number of sequences (int32) to train on after `tokens` tokens.

    The batch grows one sequence at a time from `start` to `end`; size b is used for a token span proportional to b
    (ModernBERT's thresholds, up to their rounding to whole tokens: size start + i until tokens reach
    warmup_tokens * sum(start..start+i) / sum(start..end-1)),
    i.e. the same number of steps at every size, and `end` from `warmup_tokens` on. Only the ratio tokens /
    warmup_tokens matters, so per-device counts (as the GPU code used) and global counts give the same answer. The
    trainer rounds it down to one of a few compiled sizes and trains exactly that many rows (`batch_warmup`).
    """
    _require(1 <= start <= end, f"batch_size_warmup: need 1 <= start <= end, got start={start!r}, end={end!r}")
    _require(warmup_tokens >= 0, f"batch_size_warmup: warmup_tokens must be >= 0, got {warmup_tokens!r}")
    t = _tokens(tokens)
    if start == end or warmup_tokens == 0:
        return jnp.full(jnp.shape(t), end, jnp.int32)
    sizes = np.arange(start, end, dtype=np.float64)
    # Fractions of the warmup at which the size steps up from start + i to start + i + 1 (the last one is 1.0).
    thresholds = jnp.asarray(np.cumsum(sizes) / sizes.sum(), jnp.float32)
    steps_taken = jnp.searchsorted(thresholds, t / warmup_tokens, side="right")
    return (start + steps_taken).astype(jnp.int32)
