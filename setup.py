"""ettin-jax: paired ModernBERT encoders and decoders (Ettin) in JAX/Flax."""
import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="ettin-jax",
    version="0.1.0",
    description="Paired encoder-only and decoder-only ModernBERT (Ettin) training in JAX/Flax",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["ettin_jax", "ettin_jax.*"]),
    package_data={"ettin_jax": ["kernels/cpu/native/*.cc", "kernels/cpu/native/*.h"]},  # compiled on first use (ettin_jax/kernels/cpu/build.py)
    install_requires=requirements,
    entry_points={"console_scripts": ["ettin=ettin_jax.cli:main"]},
)
