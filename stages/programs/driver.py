"""Corpus-level driver: records -> programs to trace (code + one call expression each).

Two passes, both streaming: ``harvest_corpus(records)`` collects literal call arguments by called
name over the whole corpus (small: at most 16 argument lists of at most 200 chars per name), then
``iter_programs(records, harvested=...)`` walks the corpus again and yields ``ProgramCase``s. If
``harvested`` is not given, ``records`` is materialised to a list and harvested first.

Nothing here executes corpus code: the tracer (a later stage, in a sandbox) runs
``code`` + ``def main(): return <call>`` and filters calls that fail or loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from .doctests import doctest_program, doctest_calls, extract_doctests
from .extract import ModuleIndex, extract_functions
from .harvest import harvest_corpus
from .inputs import call_expression, generate_inputs
from .parallel import parallel_modules


@dataclass
class ProgramCase:
    id: str  # f"{module_id}:{qualname}:{k}", k counting the function's inputs, then its doctests
    code: str  # standalone program: imports + dependencies + the function
    call: str  # one call expression of the function, e.g. "rgb_to_hsv(0.2, 0.4, 0.4)"
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def module_programs(rec: dict, *, seed: int, harvested: dict[str, list[str]],
                    max_inputs_per_function: int = 8, max_functions_per_module: int = 50
                    ) -> tuple[Counter, list[tuple[ProgramCase, tuple[str, ...]]]]:
    """One record's programs, in source order: (the module's own stats, [(case, the stats keys
    the case counts)]). A pure function of its arguments: modules can be done in any process
    and order, then replayed in corpus order (:func:`replay`)."""
    stats: Counter = Counter()
    out: list[tuple[ProgramCase, tuple[str, ...]]] = []
    stats["modules"] += 1
    mid, text = rec["id"], rec["text"]
    try:
        idx = ModuleIndex(text)
    except SyntaxError:
        stats["syntax_error"] += 1
        return stats, out
    skipped: dict[str, int] = {}
    cands = extract_functions(text, mid, index=idx, skipped=skipped)
    stats["functions"] += len(cands) + sum(skipped.values())
    stats["standalone"] += len(cands)
    for reason, n in skipped.items():
        stats[f"skipped:{reason}"] += n
    if len(cands) > max_functions_per_module:
        stats["over_module_cap"] += len(cands) - max_functions_per_module
        cands = cands[:max_functions_per_module]
    doctests = {d.qualname: d for d in extract_doctests(text, mid, index=idx, candidates=cands)}
    for cand in cands:
        base = {"corpus_id": mid, "path": rec.get("path"), "qualname": cand.qualname,
                "lineno": cand.lineno, "seed": seed}
        seen: set[str] = set()
        cases = generate_inputs(cand, harvested.get(cand.name, []), seed=seed,
                                max_inputs=max_inputs_per_function)
        for k, case in enumerate(cases):
            call = call_expression(cand, case)
            seen.add(call)
            kind = "doctest" if case.generator == "doctest" else "function"
            out.append((ProgramCase(f"{mid}:{cand.qualname}:{k}", cand.program, call,
                                    {**base, "input_source": case.generator, "generator": kind}),
                        (f"cases_{kind}", f"cases:{case.generator}")))
        d = doctests.get(cand.qualname)
        calls = [c for c in doctest_calls(d) if c not in seen] if d else []
        for j, call in enumerate(calls[:max_inputs_per_function]):
            out.append((ProgramCase(f"{mid}:{cand.qualname}:{len(cases) + j}", cand.program, call,
                                    {**base, "input_source": "doctest", "generator": "doctest"}),
                        ("cases_doctest", "cases:doctest")))
    return stats, out


def replay(modules: Iterable[tuple[Counter, list]], stats: Counter) -> Iterator[ProgramCase]:
    """The cases of :func:`module_programs` results (in corpus order), counting into ``stats``
    as a single pass would: a module's own stats when it is reached, a case's just before it
    is yielded (so a consumer that stops early sees the counts of what it consumed)."""
    for own, cases in modules:
        stats.update(own)
        for case, keys in cases:
            for key in keys:
                stats[key] += 1
            yield case


def iter_programs(records: Iterable[dict], *, seed: int,
                  harvested: dict[str, list[str]] | None = None,
                  max_inputs_per_function: int = 8, max_functions_per_module: int = 50,
                  stats: Counter | None = None, workers: int = 1) -> Iterator[ProgramCase]:
    """Programs for every standalone function of every record, in corpus then source order.
    Deterministic for (records, harvested, seed, caps), whatever ``workers``. ``stats`` (a
    Counter, optional) receives: modules, syntax_error, functions (module-level defs seen),
    standalone, skipped:<reason>, over_module_cap, cases_function, cases_doctest,
    cases:<input generator>. ``workers`` > 1 spreads modules over processes
    (:func:`parallel_modules`); the cases and stats are the same."""
    stats = stats if stats is not None else Counter()
    if harvested is None:
        if iter(records) is records:  # a one-shot iterator: keep it for the second pass
            records = list(records)
        harvested = harvest_corpus(records)
    caps = {"seed": seed, "max_inputs_per_function": max_inputs_per_function,
            "max_functions_per_module": max_functions_per_module}
    if workers > 1:
        modules = parallel_modules(records, harvested, caps, workers)
    else:
        modules = (module_programs(rec, harvested=harvested, **caps) for rec in records)
    return replay(modules, stats)
