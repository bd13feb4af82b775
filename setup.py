"""Builds trpo_ext._C from csrc/ against the installed torch.

Switches (environment variables):
  TRPO_EXT_FORCE_CPU=1   CPU-only build even when torch has CUDA and nvcc exists.
  FORCE_CUDA=1           CUDA build even without a visible GPU (needs nvcc and a CUDA torch).
  TORCH_CUDA_ARCH_LIST   honoured by torch's build; defaults here to "9.0" (H100/H200).
  TRPO_EXT_DEBUG=1       -O0 -g, no NDEBUG.
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("TRPO_EXT_FORCE_CPU"):
        return False
    import torch

    has_toolkit = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if _flag("FORCE_CUDA"):
        if not has_toolkit:
            raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch and nvcc (set CUDA_HOME)")
        return True
    return has_toolkit


def extensions():
    debug = _flag("TRPO_EXT_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = opt  # torch picks the language standard (C++20 from torch 2.14 on)
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], define_macros=[])
    if not debug:
        kwargs["define_macros"].append(("NDEBUG", None))
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        kwargs["define_macros"].append(("WITH_CUDA", None))
        return [cpp_extension.CUDAExtension(
            "trpo_ext._C", sources,
            extra_compile_args={"cxx": cxx, "nvcc": opt},
            **kwargs)]
    return [cpp_extension.CppExtension("trpo_ext._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
