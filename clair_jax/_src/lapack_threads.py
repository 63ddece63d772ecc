"""One thread for the LAPACK that jaxlib's CPU kernels call, set when clair_jax is imported.

On CPU, jaxlib runs the factorisations this library relies on (SVD, QR, eigh,
Cholesky, triangular solves) as custom calls into the LAPACK that SciPy exports
through ``scipy.linalg.cython_lapack``; jaxlib imports that module at the first
linear-algebra lowering. In SciPy's wheels it is a bundled OpenBLAS
(``scipy.libs/libscipy_openblas-*.so``), a library apart from NumPy's own
(``numpy.libs/libscipy_openblas64_-*.so``). Each call already runs on one of
XLA's intra-op threads, and OpenBLAS then starts a pool of its own, one thread
per core, whose threads spin while they wait for work. The two pools
oversubscribe the cores: a jitted SVD-heavy solve is slower on an idle machine
and many times slower as soon as another process shares the cores.

At import, :func:`limit_lapack_threads` finds that library (the shared object
that ``scipy.linalg.cython_lapack`` resolves ``dgesdd`` to) and sets its pool to
one thread with ``threadpoolctl``. NumPy's BLAS, when it is a different library,
is left alone. It works whenever clair_jax is imported, before or after NumPy,
SciPy or JAX, and before or after a first factorisation.

Opting out:

* ``CLAIR_JAX_LAPACK_THREADS=N`` (an integer >= 1) sets the pool to ``N``
  threads instead; ``CLAIR_JAX_LAPACK_THREADS=keep`` leaves it untouched.
* A thread count the library reads from the environment
  (``OPENBLAS_NUM_THREADS``, ``GOTO_NUM_THREADS``, ``OMP_NUM_THREADS`` for
  OpenBLAS; ``MKL_NUM_THREADS`` for MKL; ``BLIS_NUM_THREADS`` for BLIS) is the
  user's choice and is kept.
* :func:`limit_lapack_threads` can be called again at any time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import warnings

ENV_VAR = "CLAIR_JAX_LAPACK_THREADS"

# The environment variables each threading library reads at load time.
_LIBRARY_ENV_VARS = {
    "openblas": ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
    "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS"),
    "blis": ("BLIS_NUM_THREADS", "OMP_NUM_THREADS"),
}
# How LAPACK's dgesdd is exported by the builds SciPy links against (plain,
# Fortran-mangled, and scipy-openblas's prefixed names).
_PROBE_SYMBOLS = ("scipy_dgesdd_", "dgesdd_", "dgesdd", "scipy_dgesdd", "DGESDD")


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _defining_library(handle: ctypes.CDLL, symbols) -> str | None:
    """Path of the shared object that defines the first of ``symbols`` found from ``handle``."""
    dladdr = None
    for name in (None, ctypes.util.find_library("dl")):  # the process's symbols, then libdl
        try:
            dladdr = getattr(ctypes.CDLL(name), "dladdr", None)
        except OSError:
            continue
        if dladdr is not None:
            break
    if dladdr is None:
        return None
    dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    dladdr.restype = ctypes.c_int
    for name in symbols:
        try:
            address = ctypes.cast(getattr(handle, name), ctypes.c_void_p).value
        except AttributeError:
            continue
        info = _DlInfo()
        if address and dladdr(address, ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(os.fsdecode(info.dli_fname))
    return None


def lapack_library_path() -> str | None:
    """The shared object that jaxlib's CPU LAPACK kernels call into, or None if unknown.

    Imports ``scipy.linalg.cython_lapack`` (as jaxlib does on its first
    factorisation) and looks up where its LAPACK symbols resolve (``dlsym`` on
    its handle searches its dependencies, ``dladdr`` names the library).
    """
    try:
        import scipy.linalg.cython_lapack as cython_lapack
    except ImportError:
        return None
    try:
        handle = ctypes.CDLL(cython_lapack.__file__)
        return _defining_library(handle, _PROBE_SYMBOLS)
    except OSError:
        return None


def lapack_threadpool_info() -> list[dict]:
    """``threadpoolctl`` info (``num_threads``, ``filepath``, ...) of jaxlib's LAPACK library.

    Empty when the library cannot be identified or ``threadpoolctl`` is missing.
    """
    path = lapack_library_path()
    if path is None:
        return []
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    return [
        info for info in ThreadpoolController().info() if os.path.realpath(info["filepath"]) == path
    ]


def _set_threads(num_threads: int, *, keep_env: bool) -> list[dict]:
    """Sets jaxlib's LAPACK library's pool; with ``keep_env``, not where the environment set it."""
    path = lapack_library_path()
    if path is None:
        return []
    from threadpoolctl import ThreadpoolController

    changed = []
    for lib in ThreadpoolController().lib_controllers:
        if os.path.realpath(lib.filepath) != path:
            continue
        env_vars = _LIBRARY_ENV_VARS.get(lib.internal_api, ())
        if keep_env and any(os.environ.get(var) for var in env_vars):
            continue  # the user chose a thread count for this library
        lib.set_num_threads(num_threads)
        changed.append(lib.info())
    return changed


def limit_lapack_threads(num_threads: int = 1) -> list[dict]:
    """Sets the thread pool of jaxlib's CPU LAPACK library to ``num_threads``.

    Only that library is changed (see the module docstring for why); NumPy's
    own BLAS, when separate, keeps its pool. Unlike the default applied at
    import, this overrides ``OPENBLAS_NUM_THREADS`` and the like.

    Args:
      num_threads: threads for LAPACK calls issued by jaxlib, >= 1.

    Returns:
      The ``threadpoolctl`` info of the libraries changed (empty when the
      library could not be identified, e.g. without ``dladdr``).

    Raises:
      ValueError: ``num_threads`` is not an integer >= 1.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}.")
    return _set_threads(num_threads, keep_env=False)


def apply_default() -> None:
    """What ``import clair_jax`` does: one LAPACK thread unless the environment says otherwise."""
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() == "keep":
        return
    num_threads = 1
    if setting:
        try:
            num_threads = int(setting)
        except ValueError:
            num_threads = 0
        if num_threads < 1:
            warnings.warn(
                f"{ENV_VAR}={setting!r} is neither an integer >= 1 nor 'keep'; "
                "jaxlib's LAPACK pool is set to 1 thread.",
                RuntimeWarning,
                stacklevel=3,
            )
            num_threads = 1
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        warnings.warn(
            "threadpoolctl is not installed: jaxlib's LAPACK keeps one thread per core, which "
            "can make factorisations many times slower (pip install threadpoolctl, or set "
            "OPENBLAS_NUM_THREADS=1).",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    _set_threads(num_threads, keep_env=not setting)
