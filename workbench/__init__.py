"""wb: the weight diff/merge & evaluation workbench."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it ([tool.setuptools.dynamic])

from workbench import quiet  # noqa: E402 - logging filters only

quiet.install()
