"""Build of mspcnn and its NCC extension ``mspcnn._C``.

* With a CPU-only PyTorch (or MSPCNN_CPU_ONLY=1) the extension is a C++
  extension holding the CPU kernels.
* With a CUDA-enabled PyTorch and a CUDA toolkit (nvcc, CUDA_HOME) it is a CUDA
  extension that also holds the kernels of csrc/cuda/ (compiled for the
  architectures in TORCH_CUDA_ARCH_LIST, by default 8.0 and 9.0).

The build uses ninja and needs torch at build time, so install with
``pip install -e . --no-build-isolation`` after installing torch.
Set MSPCNN_NO_NATIVE=1 to build without -march=native (for a binary that is
copied to another machine).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _with_cuda():
    if os.environ.get("MSPCNN_CPU_ONLY", "0") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("MSPCNN_NO_NATIVE", "0") != "1":
        cxx.append("-march=native")
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if _with_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        kwargs["define_macros"] = [("MSPCNN_WITH_CUDA", "1")]
        return [cpp_extension.CUDAExtension("mspcnn._C", sources, **kwargs)]
    return [cpp_extension.CppExtension("mspcnn._C", sources, **kwargs)]


setup(
    name="mspcnn",
    version="0.1.0",
    description="Reference reproduction of MSP-CNN (Shen et al., ACM MM 2017) "
    "with a C++/CUDA wide-search NCC layer",
    packages=find_packages(include=["mspcnn", "mspcnn.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "protobuf>=4", "opencv-python", "lmdb"],
    extras_require={"onnx": ["onnx", "onnxruntime"], "faiss": ["faiss-cpu"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
