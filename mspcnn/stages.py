"""Training stages that can be stopped, resumed and reused: the bookkeeping behind
``tools/reproduce.py``.

A *stage* (stage 1 or stage 2 of one run) lives in a folder of its own. What its result depends on
is a JSON-able dict, its *inputs* (the solver and net by content, the data by SHA-256, the loss
weights, the seed, the device, ...; the caller decides). Two files record its state:

``<stage>.manifest.json``
    written when the stage finishes: its inputs, final weights (with their SHA-256), validation
    history, iterations and the machine that trained it (``runtime.machine_record``). A later
    invocation with the same inputs reuses the weights, provided they are still there unchanged,
    instead of training again (:func:`finished_stage`).

``<stage>.partial.json``
    written when a signal or a time limit stops the stage: its inputs, last solverstate, the
    validation history so far and the machine of each part trained so far. A later invocation
    with the same inputs resumes from that solverstate (:func:`resume_point`); a record with other
    inputs is removed. An unfinished stage never gets a manifest, so it is never taken for a result.

Resuming is exact on the same kind of processor (the solverstate holds the solver's and the data
order's state); a part trained on another machine is another draw, and the log says so. The
training itself is a callable handed in (:func:`run_resumable`, :func:`trained_stage`), so this
module knows nothing of solvers or datasets and is tested without training.
"""
import hashlib
import json
import os

from .caffe.io import atomic_write
from .runtime import machine_text

__all__ = ["Stopped", "finished_stage", "message_sha256", "other_machine_parts", "parts_text",
           "resume_point", "run_resumable", "sha256", "stop_if_stopped", "trained_on", "trained_stage"]


def sha256(path):
    """SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def message_sha256(message):
    """SHA-256 of what a parsed prototxt says rather than of its file's bytes: the message, serialised
    deterministically. An edit of the file's comments or layout keeps a manifest (and a stopped run's
    record) valid; a changed value does not."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


class Stopped(Exception):
    """Training was stopped by a signal (SIGINT, SIGTERM) or a time limit: the run is not finished."""


def stop_if_stopped(result, where, stage, partial=None, inputs=None, history=(), parts=()):
    """Raise Stopped when a signal stopped the training (``result``: an engine.SolveResult). With
    ``partial``, first record there the stage's inputs, its last snapshot, its validation history so
    far and the machine of each part trained so far (``parts``: {"machine", "iterations"}, the last
    one this part): the next invocation with the same inputs resumes from that snapshot
    (:func:`resume_point`)."""
    if result.stopped_by:
        resumable = ""
        if partial and result.snapshots:
            record = {"inputs": inputs, "solverstate": result.snapshots[-1][1],
                      "history": list(history) + list(result.history), "parts": list(parts)}
            atomic_write(partial, json.dumps(record, indent=1), mode="w")
            resumable = "; the same command resumes it from that snapshot"
        raise Stopped(f"{where}: {stage} stopped by {result.stopped_by} after iteration {result.iterations} "
                      f"(snapshot {result.weights}){resumable}; this run is left out of the results")


def resume_point(partial, inputs, where, stage):
    """(solverstate, history so far, the parts trained so far) of a stopped run of this stage with
    the same inputs, whose snapshot is still there, else (None, [], []) (and an unmatched record is
    removed). Each part is {"machine": machine_record or None where a version before 2026-12-07
    did not record it, "iterations": the iteration it stopped at or None}."""
    try:
        with open(partial) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None, [], []
    state = old.get("solverstate") if isinstance(old, dict) else None
    if isinstance(state, str) and old.get("inputs") == inputs and os.path.isfile(state) \
            and os.path.isfile(state[:-len(".solverstate")] + ".caffemodel"):
        print(f"== {where}: {stage} resumed from {state} (stopped earlier with the same inputs)", flush=True)
        parts = old.get("parts")
        if not isinstance(parts, list):
            parts = [{"machine": None, "iterations": None}]
        return state, old.get("history", []), parts
    os.remove(partial)
    return None, [], []


def parts_text(parts):
    """The machines of a stage's earlier parts, for the log: "Y to iteration N", joined by ", "."""
    return ", ".join((machine_text(p["machine"]) if isinstance(p.get("machine"), dict) else "a machine not recorded")
                     + (f" to iteration {p['iterations']}" if p.get("iterations") is not None else "")
                     for p in parts if isinstance(p, dict))


def other_machine_parts(parts, machine):
    """The earlier parts (:func:`resume_point`) not known to have trained on ``machine``."""
    return [p for p in parts if isinstance(p, dict) and p.get("machine") != machine]


def run_resumable(partial, inputs, where, stage, train, machine, announce=None):
    """Run ``train(solverstate or None)`` (it returns an engine.SolveResult) for ``stage`` ("stage1"
    or "stage2"), resuming the stopped run recorded in ``partial`` when its inputs match
    (:func:`resume_point`; else ``announce`` is printed, if given); ``machine`` is this machine's
    runtime.machine_record, and a note is printed when an earlier part trained on another. A stop
    records the run there again and raises Stopped; a finished run removes the record. Returns (the
    result, the validation history of the whole stage, the solverstate it resumed from or None, the
    earlier parts)."""
    state, before, parts = resume_point(partial, inputs, where, stage)
    if state is None and announce:
        print(announce, flush=True)
    others = other_machine_parts(parts, machine)
    if others:
        known = any(isinstance(p.get("machine"), dict) for p in others)
        print(f"== {where}: note: the earlier part trained on {parts_text(others)}, this part on "
              f"{machine_text(machine)}: " + ("the stage will match an uninterrupted run on neither" if known else
                                              "if that was another kind of processor, the stage will match an "
                                              "uninterrupted run on neither") +
              " (another draw, as another seed would be: README, \"A rerun reproduces on the same kind of "
              "processor only\")", flush=True)
    result = train(state)
    stop_if_stopped(result, where, stage.replace("stage", "stage "), partial, inputs, before,
                    list(parts) + [{"machine": machine, "iterations": result.iterations}])
    if os.path.exists(partial):
        os.remove(partial)
    return result, list(before) + list(result.history), state, parts


def finished_stage(path, inputs, where, stage):
    """The record at PATH (a stage's manifest) of a finished stage with these inputs whose weights
    are still there, unchanged (by SHA-256): {"weights", "history", "iterations", ...}, and says
    so; else None (an unreadable or unmatched manifest is left as it is: the training that follows
    overwrites it)."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(old, dict):
        return None
    weights = old.get("weights")
    if (old.get("inputs") == inputs and isinstance(weights, str) and os.path.isfile(weights)
            and sha256(weights) == old.get("weights_sha256")):
        machine = old.get("machine")  # absent in manifests written before it was recorded
        where_trained = f"; trained on {machine_text(machine)}" if isinstance(machine, dict) else ""
        earlier = old.get("earlier_parts")
        others = other_machine_parts(earlier, machine) if isinstance(earlier, list) else []
        if where_trained and others:
            where_trained += f", resumed from a part trained on {parts_text(others)}"
        print(f"== {where}: {stage} reused from {weights} (manifest matches{where_trained})", flush=True)
        return old
    return None


def trained_stage(folder, stage, inputs, where, train, machine):
    """One stage (``stage``: "stage1" or "stage2") whose snapshots, manifest and resume record live
    in FOLDER: the finished stage recorded there when its manifest matches ``inputs``
    (:func:`finished_stage`), else trained by ``train`` (:func:`run_resumable`, resuming a stopped
    run with the same inputs) and then recorded in FOLDER/<stage>.manifest.json with ``machine``.
    An unfinished stage gets no manifest (never reused), only the record to resume from. Returns
    (weights, the stage's validation history, its iterations, the machines that trained it:
    :func:`trained_on`)."""
    path = os.path.join(folder, f"{stage}.manifest.json")
    old = finished_stage(path, inputs, where, stage)
    if old is not None:
        return old["weights"], old.get("history", []), old.get("iterations", 0), trained_on(old)
    result, history, state, parts = run_resumable(os.path.join(folder, f"{stage}.partial.json"), inputs, where,
                                                  stage, train, machine, announce=f"== {where}: {stage}")
    record = {"inputs": inputs, "weights": result.weights, "weights_sha256": sha256(result.weights),
              "iterations": result.iterations, "history": history, "seconds": result.seconds,
              "resumed_from": state, "machine": machine}
    if parts:
        record["earlier_parts"] = parts  # the machines of the parts before a resume
    atomic_write(path, json.dumps(record, indent=1), mode="w")
    return result.weights, history, result.iterations, trained_on(record)


def trained_on(manifest):
    """The machines that trained a finished stage, from its manifest, for the results JSON: the
    machine_record of each part in order, the last the one that finished it (None for a machine a
    version before 2026-12-07 did not record)."""
    parts = manifest.get("earlier_parts")
    earlier = [p.get("machine") for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []
    machine = manifest.get("machine")
    return earlier + [machine if isinstance(machine, dict) else None]
