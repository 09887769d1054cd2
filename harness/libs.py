"""Third-party libraries: quiet in the user's terminal, and leaving the process as they found it.

Some libraries change the process when imported: gptqmodel prints a banner and sets ``PYTORCH_ALLOC_CONF``
(the CUDA allocator's configuration, which changes every reserved-memory figure we publish) and
``CUDA_DEVICE_ORDER``. peft imports gptqmodel from its LoRA dispatch whenever it is installed, so a run that
never uses GPTQ would pay for it all. Here gptqmodel is hidden from every import until a cell asks for GPTQ,
and that import puts back every environment variable it changed. So is torchao, which only gptqmodel needs:
transformers imports it whenever it is installed (0.55 s of every process that loads a model, on a 2-core Xeon).
A record keeps the measurement-relevant variables it ran with (:func:`measurement_env`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import io
import logging
import os
import sys
import warnings

# Variables that change what ftbench measures: the allocators' configuration and the thread pools.
MEASUREMENT_ENV = (
    "PYTORCH_ALLOC_CONF",
    "PYTORCH_CUDA_ALLOC_CONF",
    "CUDA_DEVICE_ORDER",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",  # the ISA caps: an AVX512 CPU measured as an AVX2 one
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "NVIDIA_TF32_OVERRIDE",  # TF32 in fp32 matmuls, forced on or off from outside
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
)
HIDDEN = "gptqmodel"  # imported only by a cell that quantizes with GPTQ (methods/gptq.py)
HIDDEN_WITH_IT = ("torchao",)  # gptqmodel's own dependency, hidden from transformers and peft until then


def quiet_libraries() -> None:
    """Advisory noise at import (bitsandbytes and transformers on CPU machines; torchao, pulled in by the gptq
    extra, about its CUDA-only libraries; ``kernels``, through bitsandbytes, about the hub being offline) and
    transformers' deprecation notices stay out of the terminal; gptqmodel and torchao stay unimported."""
    for name in (
        "bitsandbytes",
        "transformers",
        "peft",
        "huggingface_hub",
        "torchao",
        "torch.utils._pytree",
        "kernels",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    hide_gptqmodel()
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _CompileWhenFirstCalled) for f in sys.meta_path):
        sys.meta_path.insert(0, _CompileWhenFirstCalled())


class _CompileWhenFirstCalled(importlib.abc.MetaPathFinder):
    """bitsandbytes wraps some of its functions in ``torch.compile`` as it is imported, and building that wrapper
    imports TorchInductor's compiler (about 1 s of every process that imports peft, on a 2-core Xeon), although
    no CPU run of ours calls those functions. While bitsandbytes is imported, ``torch.compile`` builds the
    wrapper when the function is first called instead: what runs, and when it compiles, is unchanged."""

    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the package
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Deferring(spec.loader)
        return spec


class _Deferring(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):  # resources, source, is_package: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        import torch

        real = torch.compile
        torch.compile = functools.partial(_compile_when_called, real)
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = real


def _compile_when_called(real, model=None, **kwargs):
    if model is None:  # used as @torch.compile(**kwargs)
        return lambda fn: _compile_when_called(real, fn, **kwargs)
    built = []

    @functools.wraps(model)
    def first_call_builds(*args, **kw):
        if not built:
            try:
                built.append(real(model, **kwargs))
            except Exception:  # as bitsandbytes does when building fails: the plain function
                built.append(model)
        return built[0](*args, **kw)

    return first_call_builds


def hide_gptqmodel() -> None:
    """``import gptqmodel`` (and torchao) fails and ``importlib.util.find_spec`` says it is absent (a ``None``
    entry in ``sys.modules`` means both), so peft's dispatch and transformers' quantizers skip them. Nothing
    changes if they are already imported."""
    for name in (HIDDEN, *HIDDEN_WITH_IT):
        sys.modules.setdefault(name, None)


def gptqmodel_installed() -> bool:
    """Whether gptqmodel is installed, hidden or not (the path finder does not look at ``sys.modules``)."""
    return importlib.machinery.PathFinder.find_spec(HIDDEN) is not None


def import_gptqmodel_quietly(*modules: str) -> list:
    """Import gptqmodel's ``modules`` with its banner kept out of the terminal and the whole environment put back
    as it was: the measurement variables it sets (before CUDA starts, so the allocator never sees them), and its
    tokenizer library's ``HF_HOME``, ``HF_HUB_CACHE``, ``TRANSFORMERS_CACHE`` and ``HF_MODULES_CACHE``, pointed at
    /tmp/tokenicer_hf_home (a later process started from this one would read its models from there)."""
    for name in (HIDDEN, *HIDDEN_WITH_IT):
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]
    with environment_kept(), contextlib.redirect_stdout(io.StringIO()):
        with contextlib.redirect_stderr(io.StringIO()):
            return [importlib.import_module(m) for m in modules]


def measurement_env() -> dict[str, str | None]:
    """The measurement-relevant environment variables of this process, as a record keeps them."""
    return {k: os.environ.get(k) for k in MEASUREMENT_ENV}


@contextlib.contextmanager
def environment_kept(names: tuple[str, ...] | None = None):
    """The process environment as it was on entry, put back on exit (only ``names``, if given): what libraries
    set on their own meanwhile is undone. torch sets ``TORCHINDUCTOR_CACHE_DIR`` the first time an optimizer is
    built, so a run's checks run inside this: its cells get the environment the user gave, and the zygote started
    before the checks still matches it (else the first cell started a second one: seconds of imports, every run).
    """
    before = {k: os.environ.get(k) for k in names} if names is not None else dict(os.environ)
    try:
        yield
    finally:
        if names is None:
            for k in set(os.environ) - set(before):
                del os.environ[k]
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            elif os.environ.get(k) != v:
                os.environ[k] = v
