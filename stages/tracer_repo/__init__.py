"""In-sandbox side of repository-level traces (``stages.repo_traces``).

``runner`` runs a repository's unittest suite with a tracer hook and streams one JSON line per
traced activation. It needs only the standard library and the tracer package, bound into the
sandbox as ``cwtrace`` (this package is bound as ``cwrepo``); it never runs on the host.
"""
