"""Name resolution rules shared by the extractors: free names of a snippet, which standard-library
modules may be imported, and which references count as I/O or process control.

Everything here is static: we read source text with ``ast``/``symtable`` and never import or run
corpus code. The only host-side look-up is ``importlib.machinery.PathFinder.find_spec`` of a
*top-level standard library name* in the interpreter's own stdlib directories (cached; no import
hooks run, nothing is imported), so that a program never imports a stdlib module this platform
lacks (``winreg``, ``msvcrt`` ...).
"""

from __future__ import annotations

import ast
import builtins
import importlib.machinery
import os
import re
import symtable
import sys
import sysconfig
import warnings
from functools import lru_cache

# The tracer's synthetic entry point is ``def main()``: a program may not bind that name.
RESERVED_NAMES = frozenset({"main"})

# Builtins that read/write the outside world, run code, or reach into frames.
BANNED_BUILTINS = frozenset({
    "open", "input", "exit", "quit", "eval", "exec", "compile", "__import__", "globals", "locals",
    "vars", "breakpoint", "help", "copyright", "credits", "license",
    "id",  # an address: differs from run to run
})
SAFE_BUILTINS = frozenset(
    n for n in dir(builtins)
    if n not in BANNED_BUILTINS and (not n.startswith("__") or n == "__debug__"))

# Modules whose every use is I/O, concurrency, process control or interpreter surgery.
BANNED_MODULES = frozenset({
    "subprocess", "socket", "socketserver", "ssl", "select", "selectors", "asyncio", "threading",
    "_thread", "multiprocessing", "concurrent", "signal", "shutil", "tempfile", "glob", "ctypes",
    "mmap", "fcntl", "termios", "tty", "pty", "resource", "sqlite3", "dbm", "shelve", "http",
    "urllib", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib", "xmlrpc",
    "webbrowser", "logging", "atexit", "faulthandler", "tracemalloc", "pdb", "bdb", "trace",
    "cProfile", "profile", "code", "codeop", "runpy", "pkgutil", "importlib", "zipimport", "site",
    "sysconfig", "platform", "getpass", "pwd", "grp", "spwd", "crypt", "posix", "nt", "curses",
    "readline", "rlcompleter", "builtins", "gc", "wave", "sched", "syslog", "pipes", "mailbox",
    "fileinput", "filecmp", "netrc", "ensurepip", "venv", "zipapp", "idlelib", "tkinter", "turtle",
    "turtledemo", "this", "antigravity", "__main__", "pydoc", "doctest", "unittest", "test",
    # clocks and entropy: traces must be reproducible, byte for byte, run after run
    "time", "timeit", "secrets", "uuid",
})
# Attribute names that mean I/O / process control whatever module they come from.
BANNED_ATTRS = frozenset({
    "system", "popen", "exit", "_exit", "abort", "kill", "fork", "sleep", "urlopen", "getenv",
    "putenv", "environ", "environb", "stdin", "stdout", "stderr", "__stdin__", "__stdout__",
    "__stderr__", "_getframe", "settrace", "setprofile", "setrecursionlimit", "open", "open_code",
    "input", "setlocale", "getnode", "uuid1", "FileIO",
    # clocks, entropy and process identity: values would differ between runs
    "now", "today", "utcnow", "urandom", "getpid", "getppid", "perf_counter", "monotonic",
    "process_time", "time_ns", "localtime", "gmtime", "ctime",
})
# Dotted prefixes that open files or devices although their module is otherwise pure.
BANNED_DOTTED = frozenset({
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "zipfile.ZipFile",
    "zipfile.Path", "zipfile.PyZipFile", "tarfile.TarFile", "gzip.GzipFile", "bz2.BZ2File",
    "lzma.LZMAFile", "codecs.StreamReaderWriter", "mimetypes.init", "mimetypes.read_mime_types",
    "locale.setlocale", "random.SystemRandom", "uuid.uuid1", "uuid.getnode",
})
# Modules that a function must not handle as values (``getattr(os, name)`` would escape the
# attribute checks): a bare reference to one, not followed by an attribute, counts as I/O
# (checked by the extractor on references, not on the import itself).
NO_BARE_REFS = frozenset({"os", "sys", "posix", "nt", "io", "builtins", "importlib"})
PATH_PURE = frozenset({
    "join", "split", "splitext", "basename", "dirname", "normpath", "normcase", "isabs",
    "commonprefix", "commonpath", "splitdrive", "splitroot", "sep", "altsep", "extsep", "pathsep",
    "curdir", "pardir", "defpath", "devnull", "supports_unicode_filenames",
})
OS_OK = frozenset({
    "path", "sep", "altsep", "extsep", "pathsep", "linesep", "curdir", "pardir", "defpath",
    "devnull", "name", "fspath", "fsencode", "fsdecode", "PathLike", "strerror", "SEEK_SET",
    "SEEK_CUR", "SEEK_END",
})
SYS_OK = frozenset({
    "maxsize", "maxunicode", "byteorder", "version_info", "hexversion", "implementation",
    "float_info", "int_info", "hash_info", "getsizeof", "intern", "getdefaultencoding",
    "getfilesystemencoding", "getrecursionlimit", "float_repr_style", "exc_info", "platform",
    "stdlib_module_names", "builtin_module_names",
})


@lru_cache(maxsize=None)
def stdlib_importable(module: str) -> bool:
    """True if ``module`` (dotted) belongs to the standard library, may be used, and its top-level
    package exists on this interpreter."""
    top = module.split(".")[0]
    if top not in sys.stdlib_module_names or top in BANNED_MODULES or top == "__future__":
        return False
    return _stdlib_available(top)


@lru_cache(maxsize=None)
def _stdlib_available(top: str) -> bool:
    if top in sys.builtin_module_names or importlib.machinery.FrozenImporter.find_spec(top):
        return True
    paths = sysconfig.get_paths()
    dirs = list(dict.fromkeys(paths[k] for k in ("stdlib", "platstdlib") if k in paths))
    dirs += [os.path.join(d, "lib-dynload") for d in dirs]
    try:
        return importlib.machinery.PathFinder.find_spec(top, dirs) is not None
    except (ImportError, ValueError):
        return False


def io_banned(dotted: str) -> bool:
    """Is a reference to ``dotted`` (an imported name plus attribute chain, e.g. ``os.path.exists``)
    I/O or process control?"""
    parts = dotted.split(".")
    top = parts[0]
    if top in BANNED_MODULES:
        return True
    if any(".".join(parts[:i]) in BANNED_DOTTED for i in range(2, len(parts) + 1)):
        return True
    if any(p in BANNED_ATTRS for p in parts[1:]):
        return True
    if top == "os" and len(parts) > 1:
        if parts[1] not in OS_OK:
            return True
        return parts[1] == "path" and len(parts) > 2 and parts[2] not in PATH_PURE
    if top in ("posixpath", "ntpath", "genericpath") and len(parts) > 1:
        return parts[1] not in PATH_PURE and not parts[1].startswith("_")
    if top == "sys" and len(parts) > 1:
        return parts[1] not in SYS_OK
    return False


def parse(source: str) -> ast.Module:
    """ast.parse without SyntaxWarnings (invalid escapes are common in old corpus files).
    Raises SyntaxError (also for NUL bytes / too deep nesting) when the text is not Python 3."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(source)
        except (ValueError, RecursionError, MemoryError) as e:
            raise SyntaxError(str(e)) from None


_NEWLINE = re.compile(r"\r\n|\r|\n")


class SourceLines:
    """``ast.get_source_segment`` without re-splitting the whole file on every call (that is
    quadratic in the number of statements). Lines are split exactly as ``ast`` does (only
    ``\\r\\n``, ``\\r``, ``\\n``) and column offsets are UTF-8 byte offsets."""

    def __init__(self, source: str):
        self.lines: list[str] = []
        start = 0
        for m in _NEWLINE.finditer(source):
            self.lines.append(source[start:m.end()])
            start = m.end()
        self.lines.append(source[start:])

    def segment(self, node: ast.AST) -> str | None:
        try:
            lo, hi = node.lineno - 1, node.end_lineno - 1
            col, end_col = node.col_offset, node.end_col_offset
        except AttributeError:
            return None
        if lo < 0 or hi >= len(self.lines) or None in (hi, end_col):
            return None
        if lo == hi:
            return self.lines[lo].encode()[col:end_col].decode()
        first = self.lines[lo].encode()[col:].decode()
        last = self.lines[hi].encode()[:end_col].decode()
        return "".join([first, *self.lines[lo + 1:hi], last])


def compiles(source: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(source, "<program>", "exec", dont_inherit=True)
            return True
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return False


def free_names(snippet: str) -> tuple[set[str], set[str]] | None:
    """Global names a module-level snippet (a def, an assignment, an expression) needs, and the
    globals it declares with ``global`` and assigns. Names the snippet itself binds at its top level
    (the def's own name) are not free. None if symtable rejects the snippet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            top = symtable.symtable(snippet, "<snippet>", "exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None
    needed: set[str] = set()
    written: set[str] = set()
    for s in top.get_symbols():
        if s.is_referenced() and not (s.is_assigned() or s.is_imported()):
            needed.add(s.get_name())
    stack = list(top.get_children())
    while stack:
        t = stack.pop()
        for s in t.get_symbols():
            if s.is_declared_global() and s.is_assigned():
                written.add(s.get_name())
            elif s.is_global() and s.is_referenced():
                needed.add(s.get_name())
        stack.extend(t.get_children())
    return needed, written


def _children(node: ast.AST) -> list[ast.AST]:
    out = []
    for name in node._fields:
        v = getattr(node, name, None)
        if type(v) is list:
            out.extend(x for x in v if isinstance(x, ast.AST))
        elif isinstance(v, ast.AST):
            out.append(v)
    return out


def iter_nodes(node: ast.AST):
    """Every node under ``node`` (itself included), depth-first; a faster ``ast.walk``."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(_children(n))


def global_refs(node: ast.AST, names: set[str]) -> list[str]:
    """Dotted chains (``os.path.join``) of every use of a name in ``names`` inside ``node``: the
    longest attribute chain rooted at the name. A param/local that shadows a global of the same
    name is rare enough to be counted too (it only makes the check stricter)."""
    out = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Attribute):  # outermost attribute of a chain: read it whole
            attrs, cur = [], n
            while isinstance(cur, ast.Attribute):
                attrs.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                if cur.id in names:
                    out.append(".".join([cur.id, *reversed(attrs)]))
            else:  # f(x).attr, x[0].attr: the root expression may hold references
                stack.append(cur)
        elif isinstance(n, ast.Name):
            if n.id in names:
                out.append(n.id)
        else:
            stack.extend(_children(n))
    return out


def local_imports_ok(node: ast.AST) -> bool:
    """Imports inside a function body must be of usable standard-library modules, and what the
    function does with the names they bind must not be I/O (``import time; time.sleep(1)``)."""
    local: dict[str, str] = {}  # bound name -> dotted origin
    for n in iter_nodes(node):
        if isinstance(n, ast.Import):
            if not all(stdlib_importable(a.name) for a in n.names):
                return False
            for a in n.names:
                if a.asname:
                    local[a.asname] = a.name
                else:
                    local[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom):
            if n.level or not n.module or not stdlib_importable(n.module):
                return False
            for a in n.names:
                if a.name == "*" or io_banned(f"{n.module}.{a.name}"):
                    return False
                local[a.asname or a.name] = f"{n.module}.{a.name}"
    for ref in global_refs(node, set(local)):
        head, _, rest = ref.partition(".")
        origin = local[head]
        if (not rest and origin in NO_BARE_REFS) or io_banned(
                f"{origin}.{rest}" if rest else origin):
            return False
    return True
