"""What to trace: standalone functions of the corpus as self-contained programs, plus the call
expressions (inputs) to trace them with. Static analysis only (``ast``/``symtable``): corpus code
is never imported or run here; the sandboxed tracer runs the programs and filters failures.

Modules: ``scope`` (name-resolution and I/O rules), ``extract`` (standalone functions),
``calls``/``doctests`` (docstring examples), ``harvest`` (literal call arguments from the corpus),
``infer``/``values`` (parameter types, value sampling, literal rendering), ``inputs`` (input
generation), ``fuzz`` (mutation fuzzer), ``driver`` (corpus-level iteration).
"""

from .doctests import DoctestCase, doctest_calls, extract_doctests
from .driver import ProgramCase, iter_programs
from .extract import FunctionCandidate, ModuleIndex, Param, extract_functions
from .fuzz import mutate
from .harvest import harvest_calls, harvest_corpus
from .inputs import InputCase, call_expression, generate_inputs

__all__ = [
    "DoctestCase", "FunctionCandidate", "InputCase", "ModuleIndex", "Param", "ProgramCase",
    "call_expression", "doctest_calls", "extract_doctests", "extract_functions",
    "generate_inputs", "harvest_calls", "harvest_corpus", "iter_programs", "mutate",
]
