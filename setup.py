"""qn-keras: QuartzNet speech recognition for TensorFlow/Keras, end to end."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements(name="requirements.txt"):
    lines = (HERE / name).read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


setup(
    name="qn-keras",
    version="0.1.0",
    description="QuartzNet speech recognition for TensorFlow/Keras with a Beam feature pipeline",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["qn_keras*", "qn_cli*", "pipeline*", "serving*"]),
    package_data={"qn_cli": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=_requirements(),
    extras_require={
        "nemo": ["torch==2.13.0"],
        "dask": _requirements("requirements-dask.txt"),
        "lm": _requirements("requirements-lm.txt"),
        "litert": _requirements("requirements-litert.txt"),
    },
    entry_points={"console_scripts": ["qn=qn_cli.main:main"]},
)
