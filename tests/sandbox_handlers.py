"""Handlers run inside the sandbox by tests/test_sandbox.py (bound at /sandbox/lib/...)."""


def run_code(req):
    """The "program under test": exec ``req["code"]``; returns the global ``result``."""
    scope = {"__name__": "__sandboxed__"}
    exec(req["code"], scope)  # noqa: S102 - that is the point
    return {"result": scope.get("result")}


def total(req):
    """Trivial handler for benchmarks and ordering tests."""
    return {"sum": sum(req["xs"]), "id": req.get("id")}
