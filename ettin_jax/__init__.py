"""ettin-jax: Ettin's paired ModernBERT encoders and decoders in JAX/Flax."""
import importlib.util
import os

__version__ = "0.1.0"


def _skip_absent_tpu():
    """On a machine without TPU chips, keeps JAX from starting the TPU runtime that the pinned `libtpu` wheel brings
    (for `ettin compile`): that start costs time and prints libtpu's warnings about a TPU VM environment this
    machine does not have. JAX_PLATFORMS, when set, is left as it is; compile-only TPU devices still come from
    `jax.experimental.topologies`."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    import jax
    from jax._src import hardware_utils, xla_bridge
    if xla_bridge.backends_are_initialized() or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return
    platforms = "cpu"
    if hardware_utils.has_visible_nvidia_gpu():
        if not any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
            return  # JAX's own message about the missing CUDA jaxlib is the useful one there
        platforms = "cuda,cpu"
    jax.config.update("jax_platforms", platforms)


_skip_absent_tpu()
