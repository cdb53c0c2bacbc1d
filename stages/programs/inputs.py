"""Inputs for a standalone function: argument lists written as Python literal source.

Generators (``InputCase.generator``):

- ``doctest``: literal-argument calls of the function in its own docstring examples;
- ``harvested``: literal arguments of calls ``name(...)`` found anywhere in the corpus
  (``harvest.py``), kept only when they bind to the function's signature;
- ``default``: the call with no arguments, when every parameter has a default;
- ``annotation``: values sampled from each parameter's type spec (its annotation, else the type
  of its literal default, else usage/name inference, ``infer.py``; unknown -> a mixed pool of
  small ints, strings and lists; ``values.sample``). Parameters with defaults are passed only
  sometimes (then later ones go by keyword), and never when their type is unknown or they are
  called like a function; ``*args`` gets 0-2 values (typed by its annotation, else like the
  parameter before it) when every earlier positional was given, ``**kwargs`` is never filled;
- ``fuzz``: ``fuzz.mutate`` applied to the inputs above.

Determinism: every random choice comes from a ``random.Random`` seeded with a SHA-256 of
(seed, module id, qualname) and values are rendered by ``values.render`` (sets sorted), so the
text is identical across runs, processes and PYTHONHASHSEEDs.

Why not Hypothesis at run time: ``strategy.example()`` is non-deterministic by design, and even
``@seed``-ed ``@given`` runs are not reproducible across processes with Hypothesis 6.1xx: with
probability ~5% per primitive draw it substitutes constants collected from whatever *local*
modules happen to be imported (and caches them under ``./.hypothesis/``), so the same seed gives
different values depending on the importing program (checked against Hypothesis 6.170.17:
``hypothesis.internal.conjecture.providers._get_local_constants``, p=0.05). So the sampler is our
own (``values.sample``), guided by the same kind of type information a strategy would be built
from; Hypothesis is used in the tests instead (property test of the renderer and the fuzzer).
"""

import ast
import hashlib
import inspect
import random
from dataclasses import dataclass

from .extract import FunctionCandidate
from .fuzz import mutate, parse_args
from .infer import CALLABLE, infer_param_specs
from .values import Unrenderable, render, sample, spec_from_annotation

GENERATORS = ("doctest", "harvested", "default", "annotation", "fuzz")
_OMIT = object()


@dataclass(frozen=True)
class InputCase:
    args_source: str
    generator: str


def call_expression(cand: FunctionCandidate, case: InputCase) -> str:
    return f"{cand.name}({case.args_source})"


def _det_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def signature(cand: FunctionCandidate) -> inspect.Signature:
    return inspect.Signature([
        inspect.Parameter(p.name, getattr(inspect.Parameter, p.kind),
                          default=inspect.Parameter.empty if p.default is None else _OMIT)
        for p in cand.params])


def binds(sig: inspect.Signature, args_source: str) -> bool:
    try:
        pos, kws = parse_args(args_source)
        sig.bind(*pos, **dict(kws))
    except (ValueError, TypeError):
        return False
    return True


def _function_node(cand: FunctionCandidate) -> ast.FunctionDef | None:
    for st_ in reversed(ast.parse(cand.program).body):
        if isinstance(st_, ast.FunctionDef) and st_.name == cand.name:
            return st_
    return None


def _typed_inputs(cand: FunctionCandidate, n: int, seed: int) -> list[str]:
    fn = _function_node(cand)
    specs = infer_param_specs(fn) if fn is not None else {}
    params = [p for p in cand.params if p.kind != "VAR_KEYWORD"]
    if not params:
        return []
    rng = random.Random(_det_seed("typed", seed, cand.module_id, cand.qualname))
    out = []
    for _ in range(n):
        args, keyword, prev = [], False, None
        try:
            for p in params:
                if p.kind == "VAR_POSITIONAL":
                    # 0-2 extra positionals, typed by the annotation or else like the parameter
                    # before (``join(a, *p)``); impossible once an earlier one was omitted
                    spec = (spec_from_annotation(p.annotation)
                            or (None if prev == CALLABLE else prev))
                    if not keyword:
                        args += [render(sample(spec, rng)) for _ in range(rng.choice((0, 1, 1, 2)))]
                    continue
                spec = prev = specs.get(p.name)
                if p.default is not None and (spec is None or spec == CALLABLE
                                              or rng.random() < 0.7):
                    keyword = True  # omitted: later parameters must go by keyword
                    continue
                v = render(sample(None if spec == CALLABLE else spec, rng))
                if p.kind == "KEYWORD_ONLY" or (keyword and p.kind == "POSITIONAL_OR_KEYWORD"):
                    args.append(f"{p.name}={v}")
                elif not keyword:
                    args.append(v)
        except (Unrenderable, TypeError):  # TypeError: unhashable value drawn for a set/dict key
            continue
        out.append(", ".join(args))
    return list(dict.fromkeys(out))


def generate_inputs(cand: FunctionCandidate, harvested: list[str], *, seed: int,
                    max_inputs: int) -> list[InputCase]:
    """Inputs for ``cand`` (see module doc), de-duplicated, at most ``max_inputs``: doctest and
    harvested ones first (up to half), then default/annotation (up to three quarters), then fuzz
    (to the cap), then whatever is left; returned grouped in ``GENERATORS`` order (doctest,
    harvested, default, annotation, fuzz). Deterministic in (cand, harvested, seed)."""
    if max_inputs <= 0:
        return []
    sig = signature(cand)
    pools: dict[str, list[str]] = {g: [] for g in GENERATORS}
    pools["doctest"] = [a for a in cand.doctest_inputs if binds(sig, a)]
    pools["harvested"] = [a for a in harvested if binds(sig, a)]
    if all(p.default is not None or p.kind.startswith("VAR") for p in cand.params):
        pools["default"] = [""]
    pools["annotation"] = [a for a in _typed_inputs(cand, 2 * max_inputs, seed) if binds(sig, a)]
    seeds = list(dict.fromkeys(a for g in GENERATORS[:-1] for a in pools[g] if a))
    if seeds:
        rng = random.Random(_det_seed("fuzz", seed, cand.module_id, cand.qualname))
        got: list[str] = []
        for _ in range(4 * max_inputs):
            if len(got) >= max_inputs:
                break
            try:
                m = mutate(rng.choice(seeds), rng)
            except ValueError:
                continue
            if m not in got and m not in seeds and binds(sig, m):
                got.append(m)
        pools["fuzz"] = got

    chosen: dict[str, str] = {}
    limits = [(("doctest", "harvested"), max_inputs - max_inputs // 2),
              (("default", "annotation"), max_inputs - max_inputs // 4),
              (("fuzz",), max_inputs), (GENERATORS, max_inputs)]
    for gens, limit in limits:
        for g in gens:
            for a in pools[g]:
                if len(chosen) >= limit:
                    break
                chosen.setdefault(a, g)
    rank = {g: i for i, g in enumerate(GENERATORS)}  # the fill-up round must not break the order
    return sorted((InputCase(a, g) for a, g in chosen.items()), key=lambda c: rank[c.generator])
