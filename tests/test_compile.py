"""`ettin compile` and the kernel seam's platform decision: the train step traced on this CPU host for TPU devices
(compile-only devices from libtpu's topologies) lowers the TPU paths, compiles with the TPU compiler, and a step
that cannot fit is refused in one line."""
import importlib.util
import os
import re

import pytest

from ettin_jax import compile as compile_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg, **fields):
    spec = importlib.util.spec_from_file_location("ettin_config", os.path.join(REPO, "configs", "ettin.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    for k, v in fields.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def _tiny(phase="pretrain", objective="paired", **fields):
    fields = {"global_batch_size": 8, "seq_len": 256, **fields}
    return _config(f"size=tiny,objective={objective},phase={phase}", **fields)


def _identity_products(text: str, head_dim: int) -> int:
    """Products of a [..., D] fp32 table with a [D, D] matrix at HIGHEST precision: the CPU-only RoPE tables."""
    pattern = rf"dot_general[^\n]*precision = \[HIGHEST, HIGHEST\][^\n]*tensor<{head_dim}x{head_dim}xf32>"
    return len(re.findall(pattern, text))


def test_tpu_lowering_from_a_cpu_host_takes_the_tpu_paths():
    """Traced here for v5e devices, the paired step has splash kernels (Mosaic custom calls), no native CPU custom
    call and none of XLA:CPU's workarounds (identity-matmul RoPE tables, means as products); the same step traced for
    this host's one CPU device has the workarounds (the control: the pattern is really there to be found)."""
    config = _tiny()
    lowered, mesh, models = compile_lib.lower_train_step(config, compile_lib.topology_devices("v5e:2x2"))
    text = lowered.as_text()
    assert mesh.devices.flat[0].platform == "tpu"
    assert text.count("tpu_custom_call") > 0
    assert "ettin_" not in text  # the native CPU kernels' custom-call targets
    assert _identity_products(text, models["encoder"].head_dim) == 0
    assert "HIGHEST" not in text

    # One TPU device: where the native CPU kernels would apply (one device, fp32) if the platform came from the host.
    one = _tiny(**{"mesh.num_devices": 1, "model.dtype": "float32"})
    one_text = compile_lib.lower_train_step(one, compile_lib.topology_devices("v5e:2x2"))[0].as_text()
    assert "ettin_" not in one_text and one_text.count("tpu_custom_call") > 0

    cpu = _tiny(**{"mesh.num_devices": 1})
    cpu_text = compile_lib.lower_train_step(cpu)[0].as_text()
    assert _identity_products(cpu_text, models["encoder"].head_dim) > 0
    assert "tpu_custom_call" not in cpu_text


def test_unknown_topology_is_one_clear_error():
    with pytest.raises(compile_lib.CompileError, match="v5e:2x2"):
        compile_lib.topology_devices("v5p-8")
    with pytest.raises(compile_lib.CompileError, match="examples"):
        compile_lib.topology_devices("v99:2x2")


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_paired_step_compiles_for_tpu(topology):
    result = compile_lib.compile_train_step(_tiny(), compile_lib.topology_devices(topology))
    assert result["fits"] and result["platform"] == "tpu" and result["num_devices"] == 4
    assert result["mosaic_kernels"] > 0 and result["native_cpu_calls"] == 0
    assert 0 < result["peak_bytes"] < result["hbm_bytes"]
    # The written-down FLOP formula, not the compiler's count (which leaves out the Mosaic kernels).
    assert result["model_flops_per_step"] > 0


@pytest.mark.slow
def test_long_context_phase_compiles_with_splash():
    """The extension phase's 7999-token rows (no multiple of 128) run through splash, padded inside the kernel; no
    layer falls back to an XLA path that would hold [T, T] scores."""
    config = _tiny(phase="extension", objective="mlm", global_batch_size=4, seq_len=7999)
    assert config.seq_len == 7999
    result = compile_lib.compile_train_step(config, compile_lib.topology_devices("v5e:2x2"))
    assert result["fits"] and result["mosaic_kernels"] > 0
    # Dense [T, T] fp32 scores of one layer for one row's heads would be 7999^2 * 4 bytes * heads = 0.5 GiB+.
    assert result["temp_bytes"] < 2 ** 30


@pytest.mark.slow
def test_multi_slice_topology_compiles():
    config = _tiny(**{"mesh.dcn_data": 2})
    result = compile_lib.compile_train_step(config, compile_lib.topology_devices("v5e:2x2", num_slices=2))
    assert result["fits"] and result["num_devices"] == 8 and result["mesh"]["data"] == 8


@pytest.mark.slow
def test_a_step_that_cannot_fit_gets_one_line_and_exit_2(capsys):
    argv = ["ettin compile", "--config=configs/ettin.py:size=150m,objective=mlm,phase=pretrain",
            "--topology=v5e:2x2", "--config.global_batch_size=4608", "--config.model.dtype=float32"]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert compile_lib.main(argv) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "does not fit" in err and "micro_batch_size" in err and "remat" in err


def test_a_machine_without_tpu_chips_starts_no_tpu_runtime():
    """libtpu is installed (pinned for `ettin compile`), yet importing ettin_jax on this TPU-less host keeps JAX to
    its CPU backend: CPU devices and no libtpu warnings on stderr (compile-only TPU devices still come: the tests
    above)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
    out = subprocess.run([sys.executable, "-c", "import ettin_jax, jax; print(jax.devices()[0].platform)"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu"]
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr
