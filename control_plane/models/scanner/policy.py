"""Which pickle globals a model file may reference.

Three outcomes for a `module.name` a pickle imports:

* allowlisted (no finding): what `torch.save`, numpy and plain containers need to
  rebuild tensors and state dicts, and nothing that can reach the file system, the
  network, the interpreter or another deserializer;
* denylisted (CRITICAL): callables that run commands or code, import modules, open
  files or sockets, load another pickle, or wrap a call so that a second global runs it
  (`functools.partial`, `operator.methodcaller`...);
* anything else (HIGH): unknown code the loader would import. Full-model pickles
  (`torch.nn.modules...`, user classes) land here on purpose: the safe way to ship
  weights is a state dict or safetensors, and a person can still approve the model.

The denylist only separates CRITICAL from HIGH; safety comes from the allowlist. Both
lists are reviewed by hand: any change bumps `SCANNER_VERSION` (see `__init__`), which
re-scans every stored model.
"""

from __future__ import annotations

import _compat_pickle
from dataclasses import dataclass
from typing import Final

from workflows.contracts.models import Severity

_TORCH_DTYPES: Final = (
    "float32 float float64 double float16 half bfloat16 complex32 chalf complex64 cfloat"
    " complex128 cdouble uint8 uint16 uint32 uint64 int8 int16 short int32 int int64 long"
    " bool qint8 quint8 qint32 quint4x2 quint2x4 float8_e4m3fn float8_e5m2"
    " float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2 bits8 bits16"
    " bits1x8 bits2x4 bits4x2"
).split()
# Legacy typed storages `torch.save` names in persistent ids (`torch.FloatStorage`...).
_TORCH_STORAGES: Final = (
    "Double Float Half BFloat16 Long Int Short Char Byte Bool ComplexFloat ComplexDouble"
    " QUInt8 QInt8 QInt32 QUInt4x2 QUInt2x4 Untyped Typed"
).split()
_TORCH_REBUILD: Final = (
    "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter"
    " _rebuild_parameter_with_state _rebuild_qtensor _rebuild_sparse_tensor"
    " _rebuild_device_tensor_from_numpy _rebuild_device_tensor_from_cpu_tensor"
    " _rebuild_meta_tensor_no_storage"
).split()
# Constants torch pickles by name: memory formats, layouts, quantization schemes.
_TORCH_CONSTANTS: Final = (
    "contiguous_format channels_last channels_last_3d preserve_format strided sparse_coo"
    " sparse_csr sparse_csc sparse_bsr sparse_bsc _mkldnn per_tensor_affine"
    " per_channel_affine per_tensor_symmetric per_channel_symmetric"
    " per_channel_affine_float_qparams"
).split()
_BUILTIN_TYPES: Final = (
    "set frozenset slice complex bytearray range bytes int float bool str tuple list dict"
).split()

ALLOWLIST: Final[frozenset[str]] = frozenset(
    [f"torch._utils.{name}" for name in _TORCH_REBUILD]
    + [f"torch.{name}" for name in _TORCH_DTYPES + _TORCH_CONSTANTS]
    + [f"torch.{kind}Storage" for kind in _TORCH_STORAGES]
    + [f"torch.storage.{kind}Storage" for kind in ("Untyped", "Typed")]
    + [
        "torch._tensor._rebuild_from_type_v2",
        "torch.Tensor",
        "torch.Size",
        "torch.device",
        "torch.dtype",
        "torch.nn.parameter.Parameter",
        # Looks a layout up by name in a table of torch constants.
        "torch.serialization._get_layout",
    ]
    + [f"builtins.{name}" for name in _BUILTIN_TYPES]
    + [f"collections.{name}" for name in ("OrderedDict", "defaultdict", "Counter", "deque")]
    + [f"datetime.{name}" for name in ("datetime", "date", "time", "timedelta", "timezone")]
    + [
        # Protocol 2 pickles bytes as `_codecs.encode(text, "latin1")`.
        "_codecs.encode",
        "numpy.ndarray",
        "numpy.dtype",
    ]
    + [
        f"numpy.{core}.{name}"
        for core in ("core", "_core")
        for name in ("multiarray._reconstruct", "multiarray.scalar", "numeric._frombuffer")
    ]
)

# Harmless by themselves (they call `cls.__new__` on classes the same pickle names, and
# those are classified on their own), but they are how arbitrary objects get rebuilt:
# worth a look.
REVIEW: Final[frozenset[str]] = frozenset(
    ["copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__"]
)

# Every global inside these modules (or their submodules) is CRITICAL.
DENY_MODULES: Final[frozenset[str]] = frozenset(
    # Processes, the OS, the interpreter.
    "os posix nt posixpath ntpath subprocess _posixsubprocess pty tty signal sys runpy"
    " importlib imp zipimport pkgutil site sysconfig code codeop compileall py_compile"
    " pdb bdb trace timeit profile cProfile doctest pydoc gc ctypes _ctypes cffi"
    " threading _thread multiprocessing concurrent asyncio sched platform resource fcntl"
    " mmap select selectors _winapi msvcrt winreg"
    # Other deserializers and code loaders.
    " pickle _pickle pickletools marshal shelve dill cloudpickle joblib yaml copyreg"
    # Files and archives.
    " io _io pathlib tempfile shutil glob fileinput linecache tarfile zipfile dbm"
    " sqlite3 _sqlite3 logging"
    # Network.
    " socket _socket ssl socketserver http urllib urllib3 requests httpx aiohttp ftplib"
    " smtplib smtpd poplib imaplib nntplib telnetlib xmlrpc webbrowser wsgiref"
    # Framework entry points that load files, fetch code or compile it.
    " torch.hub torch.serialization torch.package torch.utils.cpp_extension"
    " torch.distributed torch.jit numpy.testing numpy.f2py numpy.distutils numpy.ctypeslib"
    " numpy.lib.format numpy.lib.npyio pandas.io".split()
)
DENY_EXACT: Final[frozenset[str]] = frozenset(
    [
        f"builtins.{name}"
        for name in (
            "eval exec compile __import__ getattr setattr delattr open globals locals vars"
            " breakpoint input help exit quit __build_class__ __loader__ map filter"
        ).split()
    ]
    + [f"functools.{name}" for name in ("partial", "partialmethod", "reduce")]
    + [f"_functools.{name}" for name in ("partial", "reduce")]
    + [
        f"{module}.{name}"
        for module in ("operator", "_operator")
        for name in ("attrgetter", "methodcaller", "itemgetter", "call")
    ]
    + [
        f"types.{name}"
        for name in (
            "CodeType FunctionType LambdaType MethodType ModuleType BuiltinFunctionType new_class"
        ).split()
    ]
    + [
        "itertools.starmap",
        "torch.load",
        "torch.storage._load_from_bytes",
        "numpy.load",
        "numpy.fromfile",
        "numpy.memmap",
        "pandas.read_pickle",
    ]
)
# Names that run something whatever module they come from.
DENY_NAMES: Final[frozenset[str]] = frozenset(
    "system popen popen2 popen3 popen4 eval exec execfile execv execve execl execle execlp"
    " execvp execvpe spawnl spawnle spawnlp spawnv spawnve spawnvp spawnvpe startfile"
    " check_output check_call getoutput getstatusoutput run_path run_module _run_code"
    " _run_module_code __import__".split()
)


@dataclass(frozen=True, slots=True)
class Classification:
    severity: Severity | None
    code: str
    reason: str


ALLOWED = Classification(None, "", "allowlisted")


def _canonical(module: str, name: str) -> tuple[str, str]:
    """The name Python 3 loads for a protocol 0-2 pickle (`__builtin__` -> `builtins`)."""
    mapped = _compat_pickle.NAME_MAPPING.get((module, name))
    if mapped is not None:
        return mapped
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _denied(dotted: str) -> bool:
    if dotted in DENY_EXACT:
        return True
    parts = dotted.split(".")
    return any(".".join(parts[:end]) in DENY_MODULES for end in range(1, len(parts)))


def _classify_exact(module: str, name: str) -> Classification:
    full = f"{module}.{name}"
    if full in ALLOWLIST:
        return ALLOWED
    if full in REVIEW:
        return Classification(Severity.MEDIUM, "pickle.global.review", f"{full} rebuilds objects")
    name_parts = name.split(".")
    # `find_class` resolves dotted names attribute by attribute (protocol 4+), so
    # `torch` + `os.system` reaches `os.system`: judge every suffix of the path too.
    candidates = [full] + [".".join(name_parts[start:]) for start in range(len(name_parts))]
    if any(_denied(candidate) for candidate in candidates) or name_parts[-1] in DENY_NAMES:
        return Classification(Severity.CRITICAL, "pickle.global.denied", f"{full} can run code")
    if len(name_parts) > 1 and any(
        part.startswith("__") and part.endswith("__") for part in name_parts
    ):
        return Classification(
            Severity.CRITICAL, "pickle.global.denied", f"{full} walks dunder attributes"
        )
    return Classification(Severity.HIGH, "pickle.global.unlisted", f"{full} is not allowlisted")


def classify_global(module: str, name: str) -> Classification:
    """How bad it is for a pickle to import `module.name`."""
    canonical = _canonical(module, name)
    verdict = _classify_exact(*canonical)
    if canonical == (module, name):
        return verdict
    # With protocol 3+ (or fix_imports=False) the raw name is imported as is; only a
    # dangerous raw reading changes the outcome (a Python 2 module name fails to import).
    raw = _classify_exact(module, name)
    if raw.severity is Severity.CRITICAL:
        return raw
    if verdict.severity is None:
        return verdict
    return Classification(verdict.severity, verdict.code, f"{verdict.reason} ({module}.{name})")


# Callables that unpickle (or otherwise deserialize) the bytes given to them.
LOADERS: Final[frozenset[str]] = frozenset(
    [
        f"{module}.{name}"
        for module in ("pickle", "_pickle", "dill", "cloudpickle")
        for name in ("loads", "load", "Unpickler", "_loads", "_load")
    ]
    + ["marshal.loads", "torch.load", "numpy.load", "joblib.load", "pandas.read_pickle"]
)
