"""Stage `agent`: ForagerAgent-style mutate-fix data (CWM's agentic trajectories).

Per repository environment (``agent.repositories``; one shard of each dataset, the unit of
resume): validate the pinned tree (its suite passes in the sandbox), synthesise bugs
(``validate.synthesize``: AST mutations on covered lines, kept when, over the whole suite run
on the buggy tree, >= 1 test goes FAIL_TO_PASS and >= 1 stays PASS_TO_PASS, and the reward
gives the original tree 1.0 and the buggy one 0.0), then let every policy of ``agent.policies`` work on every kept
bug (``loop.run_episode``) and score it with the hidden tests (``reward.evaluate``).

Outputs: ``agent/tasks`` (the bug instances, reusable for RL), ``agent/trajectories``
(messages, tool calls, observations, reward, task metadata; failed trajectories kept, as CWM
trains on both) and ``agent/traces`` (CWM-format execution traces of each task's failing
tests, through the repository tracer of the traces stage, for mid-training), ``metrics/agent.json`` (instances per repository and operator, validation
yield, each policy's success rate and mean turns), an MLflow run and, through the flow, a
Prefect table artifact of those metrics.

Modules: envs (sources, sandboxed test runs), mutate (operators), validate (bug synthesis),
tools (bash/edit/create/submit), policies (scripted, openai), loop (episode), reward.
"""
from __future__ import annotations

import hashlib
import logging
import statistics
import subprocess
import tarfile
import time
import urllib.error
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from codeworld.code import Code
from codeworld.config import AgentConfig, Params, metric_key
from codeworld.sandbox import SandboxUnavailable
from codeworld.shards import MANIFEST, DatasetWriter, ShardInfo, fingerprint, pin_manifest, shard_name
from codeworld.storage import Storage
from codeworld.tracking import StageRun
from stages.agent.envs import EnvError, build_env, error_text
from stages.agent.failing_traces import failing_test_traces
from stages.agent.loop import run_episode, sweep_orphans
from stages.agent.mutate import OPERATORS
from stages.agent.policies import PolicyUnavailable, make_policy
from stages.agent.validate import synthesize

CODE = Code(("stages.agent",))

REPO_CACHE = ".cache/repos"  # fetched sdists and git exports, outside the DVC outputs
log = logging.getLogger(__name__)


def repo_seed(seed: int, name: str) -> int:
    """Each repository's own seed: adding a repository leaves the others' bugs unchanged."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def _trajectory(task: dict, policy: str, ep: dict) -> dict:
    meta = {k: task[k] for k in ("id", "repo", "version", "sha256", "commit", "file", "line",
                                 "operator", "FAIL_TO_PASS")}
    return {"id": hashlib.sha256(f"{task['id']}:{policy}".encode()).hexdigest()[:16],
            "task_id": task["id"], "repo": task["repo"], "policy": policy, "task": meta, **ep}


def _invalid(meta: dict, t0: float, reason: str) -> tuple[list, list, list, dict]:
    """What build_repo returns for a repository recorded as invalid (and why)."""
    meta["validation"] = {"repo": meta["repo"], "valid": False, "reason": reason[:500]}
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return [], [], [], meta


def build_repo(repo, cfg: AgentConfig) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(tasks, trajectories, failing-test traces, shard meta) of one repository environment."""
    t0 = time.perf_counter()
    meta = {"repo": repo.name, "tried": {}, "valid": {}, "kept": {}, "rejected": {}, "episodes": [],
            "traces": 0, "broken_traces": 0}
    try:
        env = build_env(repo, REPO_CACHE)
    except urllib.error.HTTPError as err:
        if err.code not in (404, 410):   # the index answered "no such project or file": a
            raise ConnectionError(f"agent.repositories[{repo.name}]: cannot fetch: {err}") from err
        return _invalid(meta, t0, f"agent.repositories[{repo.name}]: {err.url}: HTTP {err.code}"
                                  f" (no such project or file on the index: check the name)")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        raise ConnectionError(f"agent.repositories[{repo.name}]: cannot fetch: {err}") from err
    except (EnvError, ValueError, OSError, tarfile.TarError, subprocess.SubprocessError) as err:
        # bad pin, missing commit or blob, a link out of the tree, git too slow: recorded,
        # named (envs names most; whatever else comes through is named here)
        return _invalid(meta, t0, str(err) if isinstance(err, EnvError) else
                        f"agent.repositories[{repo.name}]: {error_text(err)}")
    try:
        syn = synthesize(env, seed=repo_seed(cfg.seed, repo.name), max_mutants=cfg.max_mutants_per_repo,
                         max_tasks=cfg.max_tasks_per_repo, batch=cfg.mutant_batch,
                         mutant_timeout=cfg.mutant_timeout_seconds, wall_seconds=cfg.test_wall_seconds,
                         baseline_runs=cfg.baseline_runs)
    except SandboxUnavailable:
        raise
    except Exception as err:  # one broken repository is recorded, never stops the stage
        return _invalid(meta, t0, f"synthesis failed: {type(err).__name__}: {err}")
    env = syn.env  # the baseline run's view: files holding collected tests are test files
    meta.update(validation=syn.stats["validation"], tried=dict(syn.stats["tried"]),
                valid=dict(syn.stats["valid"]), kept=dict(syn.stats["kept"]), rejected=dict(syn.stats["rejected"]),
                pool=syn.stats.get("pool", 0))
    trajectories = []
    for task in syn.tasks:
        for name in cfg.policies:
            try:
                ep = run_episode(task, env, make_policy(name, cfg), max_turns=cfg.max_turns,
                                 max_tokens=cfg.max_tokens, observation_chars=cfg.observation_chars,
                                 tool_wall_seconds=cfg.tool_wall_seconds,
                                 test_wall_seconds=cfg.test_wall_seconds,
                                 max_workdir_mb=cfg.max_workdir_mb)
            except (SandboxUnavailable, PolicyUnavailable):
                raise  # the stage stops (a rerun resumes): an outage is no trajectory to keep
            except Exception as err:  # one broken episode is counted, never stops the stage
                meta["episodes"].append({"policy": name, "broken": f"{type(err).__name__}: {err}"[:300]})
                continue
            trajectories.append(_trajectory(task, name, ep))
            meta["episodes"].append({"policy": name, "reward": ep["reward"], "turns": ep["turns"],
                                     "tokens": ep["tokens"], "submitted": ep["submitted"],
                                     "stop_reason": ep["stop_reason"],
                                     "tampered": "tampered" in ep["hidden_tests"]})
    traces = []
    for task in syn.tasks if cfg.failing_traces else ():
        try:
            recs, _ = failing_test_traces(task, env, max_traces=cfg.failing_traces_per_task,
                                          wall_seconds=cfg.failing_traces_wall_seconds)
        except SandboxUnavailable:
            raise
        except Exception:  # counted; the task and its trajectories stand without traces
            meta["broken_traces"] += 1
            continue
        traces += recs
    meta["traces"] = len(traces)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return syn.tasks, trajectories, traces, meta


def summarize(metas: list[dict], cfg: AgentConfig) -> dict:
    tried: Counter = Counter()
    valid_: Counter = Counter()
    kept: Counter = Counter()
    rejected: Counter = Counter()
    for m in metas:
        tried.update(m["tried"])
        valid_.update(m["valid"])
        kept.update(m["kept"])
        rejected.update(m["rejected"])
    valid = sum(bool(m["validation"].get("valid")) for m in metas)
    metrics: dict = {"repos": len(metas), "repos_valid": valid,
                     "validation_yield": round(valid / len(metas), 4) if metas else 0.0,
                     "mutants_tried": sum(tried.values()), "mutants_valid": sum(valid_.values()),
                     "tasks": sum(kept.values()), "failing_test_traces": sum(m["traces"] for m in metas),
                     "broken_failing_traces": sum(m["broken_traces"] for m in metas),
                     # bugs among tried mutants (kept or not: the per-repo cap is not a rejection)
                     "mutant_yield": round(sum(valid_.values()) / sum(tried.values()), 4) if tried else 0.0}
    for op in OPERATORS:
        metrics[f"tried_{op}"] = tried[op]
        metrics[f"valid_{op}"] = valid_[op]
        metrics[f"kept_{op}"] = kept[op]
    for m in metas:
        metrics[f"tasks_{metric_key(m['repo'])}"] = sum(m["kept"].values())
    episodes = [e for m in metas for e in m["episodes"]]
    for policy in cfg.policies:
        eps = [e for e in episodes if e["policy"] == policy and "broken" not in e]
        metrics[f"episodes_{policy}"] = len(eps)
        metrics[f"broken_episodes_{policy}"] = sum(e["policy"] == policy and "broken" in e for e in episodes)
        metrics[f"success_rate_{policy}"] = round(statistics.fmean(e["reward"] for e in eps), 4) if eps else 0.0
        metrics[f"mean_turns_{policy}"] = round(statistics.fmean(e["turns"] for e in eps), 2) if eps else 0.0
        metrics[f"mean_tokens_{policy}"] = round(statistics.fmean(e["tokens"] for e in eps), 1) if eps else 0.0
        # rewards refused because the canaries went wrong; working copies grown past the limit
        metrics[f"tampered_{policy}"] = sum(e.get("tampered", False) for e in eps)
        metrics[f"workdir_limit_{policy}"] = sum(e.get("stop_reason") == "workdir_limit" for e in eps)
    return {"metrics": metrics,
            "repositories": [{"repo": m["repo"], "validation": m["validation"], "pool": m.get("pool", 0),
                              "tried": m["tried"], "valid": m["valid"], "kept": m["kept"],
                              "rejected": m["rejected"]} for m in metas],
            "operators": {op: {"tried": tried[op], "valid": valid_[op], "kept": kept[op]}
                          for op in OPERATORS},
            "rejected": dict(rejected)}


def run(params: Params, *, track: bool = True, metrics_path: str | None = "metrics/agent.json",
        output: str = "agent") -> dict:
    cfg = params.agent
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    with StageRun("agent", params.model_dump(include={"storage", "agent"}),
                  params.tracking.experiment, metrics_path, track) as run_:
        fp = fingerprint(CODE, "agent", 1, cfg.model_dump(exclude={"workers"}))
        names = ("tasks", "trajectories", "traces")
        writers = [DatasetWriter(storage, f"{output}/{n}", fp) for n in names]
        done = [w.prepare() for w in writers]
        if all(d is not None for d in done):
            run_.log(**done[1]["stats"]["metrics"])
            return _result(names, done)
        if swept := sweep_orphans():
            log.info("agent: removed %d episode folders of killed runs", swept)
        results: dict[int, tuple] = {}  # repo index -> (shard info per dataset, meta)
        todo = []
        for i in range(len(cfg.repositories)):
            known = _completed(writers, done, i)
            if known is not None:
                results[i] = known
            else:
                todo.append(i)
        if todo:
            # shards of a dataset finished before the kill are about to be rewritten (an openai
            # policy's episodes need not come out the same): unfinished again first, so that no
            # manifest lists a shard that is not the file's
            for w, d in zip(writers, done):
                if d is not None:
                    w.out.remove(MANIFEST)
                    w.prepare()
        _build_all(todo, cfg, writers, results)
        order = sorted(results)
        metas = [results[i][1] for i in order]
        report = summarize(metas, cfg)
        m_tasks, m_traj, m_traces = (
            w.finish([results[i][0][k] for i in order], {"stats": report}) for k, w in enumerate(writers))
        for n, m in zip(names, (m_tasks, m_traj, m_traces)):
            pin_manifest(storage, f"{output}/{n}", m)
        # timings go to the metrics only: the manifests stay byte-identical run after run
        run_.log(**report["metrics"], **{f"seconds_{metric_key(m['repo'])}": m["seconds"] for m in metas})
        run_.artifact(report, "agent_report.json")
        return _result(names, (m_tasks, m_traj, m_traces))


def _completed(writers, done, index: int) -> tuple[list[ShardInfo], dict] | None:
    """(shard info per dataset, meta) of repository ``index`` when an earlier run wrote it in
    every dataset, else None. A dataset already finished (the run was killed between the
    writers' finishes) has its shards in its manifest, the meta in the others' records."""
    infos, meta = [], None
    for w, manifest in zip(writers, done):
        if manifest is None:
            got = w.completed(index)
            if got is not None:
                meta = got[1]
            infos.append(got and got[0])
        else:
            infos.append(_finished_shard(w, manifest, index))
    if meta is None or any(info is None for info in infos):
        return None
    return infos, meta


def _finished_shard(writer: DatasetWriter, manifest: dict, index: int) -> ShardInfo | None:
    """Shard ``index`` as a finished dataset's manifest lists it, when the file is that one."""
    name = shard_name(index)
    listed = next((s for s in manifest.get("shards", []) if s.get("name") == name), None)
    if listed is None:
        return None
    try:
        info = ShardInfo(**listed)
        data = writer.out.read_bytes(name)
    except (TypeError, FileNotFoundError):
        return None
    return info if hashlib.sha256(data).hexdigest() == info.sha256 else None


def _build_all(todo: list[int], cfg: AgentConfig, writers: list[DatasetWriter],
               results: dict[int, tuple]) -> None:
    """Build the repositories of ``todo`` and write each one's shards as it finishes (shard
    index = repository index: the datasets are the same whatever order they finish in). At
    most ``cfg.workers`` are submitted at a time, the next one when one finishes: after the
    first error (an outage: build_repo records everything else) none is started; those
    running finish and are written, then it is raised, so that a rerun redoes only what was
    not written. (Cancelling queued futures instead raced the pool's threads, which take the
    next item as soon as they are free.)"""
    first = None
    queue = iter(todo)
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:  # sandboxes are processes
        running: dict = {}

        def start_next() -> None:
            i = next(queue, None)
            if i is not None:
                running[pool.submit(build_repo, cfg.repositories[i], cfg)] = i

        for _ in range(cfg.workers):
            start_next()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=running.get):
                i = running.pop(fut)
                try:
                    *parts, meta = fut.result()
                except Exception as err:
                    if first is None:
                        first = err
                        log.error("agent: repository %s stopped the stage: %s: %s; the "
                                  "repositories still running are finished and written first",
                                  cfg.repositories[i].name, type(err).__name__, err)
                    continue
                results[i] = ([w.write(i, recs, meta) for w, recs in zip(writers, parts)], meta)
                if first is None:
                    start_next()
    if first is not None:
        raise first


def _result(names, manifests) -> dict:
    """What the CLI prints: records are trajectories; the three datasets pin their own
    manifests (no "shards" key, so the CLI does not pin a fourth)."""
    by = dict(zip(names, manifests))
    return {"records": by["trajectories"]["records"], "tasks": by["tasks"]["records"],
            "traces": by["traces"]["records"],
            "datasets": {n: [s["sha256"] for s in m["shards"]] for n, m in by.items()}}
