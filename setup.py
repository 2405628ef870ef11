"""Builds the native CPU kernels (mlx_mistral/kernels/cpu_qmm.c) during `pip install`.

Optional by design: if no C compiler works, the package still installs; the kernels are then
compiled at first use, or MLX's own (slow) quantized matmul is used with a one-time warning.
Everything else about the package lives in pyproject.toml.
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# the compile helper, loaded by path: the package itself cannot be imported before install
_spec = importlib.util.spec_from_file_location("_build", Path(__file__).parent / "mlx_mistral" / "kernels" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


class OptionalNativeBuild(build_ext):
    """A plain C shared library (loaded with ctypes, not imported), built with our own flags."""

    def build_extension(self, ext):
        failure = _build.compile_library(Path(self.get_ext_fullpath(ext.name)))
        if failure:
            print(f"warning: native CPU kernels not built ({failure}); they will be built at first use if possible")


setup(
    ext_modules=[Extension("mlx_mistral.kernels._cpu_qmm", sources=["mlx_mistral/kernels/cpu_qmm.c"],
                           depends=["mlx_mistral/kernels/cpu_pool.h", "mlx_mistral/kernels/cpu_model.h"])],
    cmdclass={"build_ext": OptionalNativeBuild},
)
