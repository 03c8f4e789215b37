"""``kfac-lab`` (also ``python -m kfac_lab``): train, list runs, run studies, benchmarks, the lab.

    kfac-lab train --problem mnist --optimizer kfac --steps 500 --store runs/lab.zarr
    kfac-lab train --store runs/lab.zarr --resume RUN_ID --steps 1000 [--from-step K]
    kfac-lab train --store runs/lab.zarr --branch RUN_ID --steps 1000 [--from-step K]
    kfac-lab runs --store runs/lab.zarr
    kfac-lab study --figure 1 --store runs/lab.zarr
    kfac-lab bench race --quick
    kfac-lab lab

``--store`` defaults to ``$KFAC_LAB_STORE`` when set. Errors (bad arguments, a missing store or
run, a problem that needs a file, a study over its memory limit — any of the library's own errors)
are one line on stderr and exit status 2 — no traceback; an internal error (a bug) is one line and
exit status 1; ``--debug`` (or ``KFAC_LAB_DEBUG=1``) shows the traceback of either.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import warnings
from pathlib import Path

from .cli_types import damping as _damping, decay as _decay, mu_max as _mu_max, nonneg_int as _nonneg_int
from .cli_types import option as _option, positive_float as _positive_float
from .cli_types import positive_int as _positive_int, seed as _seed

__all__ = ["main", "build_parser"]

ENV_STORE = "KFAC_LAB_STORE"
ENV_DEBUG = "KFAC_LAB_DEBUG"
PACKAGE_DIR = Path(__file__).resolve().parent
LAB_ADDRESS = "127.0.0.1"
LAB_PORT = 5006
FIGURES = ("1", "2", "5", "6", "7", "cumulants", "invariance")
REPO_ROOT = Path(__file__).resolve().parents[1]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------ helpers
def _store_arg(p: argparse.ArgumentParser, required_hint: str) -> None:
    env = os.environ.get(ENV_STORE, "").strip()
    p.add_argument("--store", metavar="PATH", default=env or None, required=not env,
                   help=f"the lab store (a zarr directory or URL){'; default $' + ENV_STORE if env else ''}. "
                        + required_hint)


def _open_existing(path: str):
    from .store import Store, StoreError

    local = Path(path[len("file://"):] if path.startswith("file://") else path).expanduser()
    if "://" not in path or path.startswith("file://"):
        if not local.exists() or (local.is_dir() and not any(local.iterdir())):
            raise CLIError(f"no store at {path!r}: check --store (or ${ENV_STORE}); a store is created by "
                           f"`kfac-lab train --store {path} ...` or `kfac-lab study --figure 1 --store {path}`")
    try:
        return Store(path, mode="r")
    except StoreError as exc:
        raise CLIError(str(exc)) from None


def _open_writable(path: str):
    from .store import Store, StoreError

    try:
        return Store(path, flush_every=100, flush_interval=2.0)
    except StoreError as exc:
        raise CLIError(str(exc)) from None


def _warnings_as_lines(command: str, caught) -> None:
    """Print caught store warnings as one line each (no file:line noise)."""
    from .store import StoreWarning

    for w in caught:
        if issubclass(w.category, StoreWarning):
            print(f"kfac-lab {command}: warning: {w.message}", file=sys.stderr, flush=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


# ------------------------------------------------------------------------------ train
def _check_options(optimizer: str, options: dict) -> None:
    """Every ``--option KEY=VALUE`` names an option of ``optimizer``, else a CLIError listing them."""
    import inspect

    from .optim import KFAC, Adam, SGDNesterov

    cls = {"kfac": KFAC, "sgd": SGDNesterov, "adam": Adam}[optimizer]
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [k for k, p in params.items() if k not in ("self", "model", "loss", "seed")
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    bad = [k for k in options if k not in known]
    if bad:
        raise CLIError(f"--option {bad[0]}=...: {bad[0]!r} is not an option of --optimizer {optimizer}; "
                       f"its options: {', '.join(known)}")


def _check_device(device: str | None) -> None:
    """``--device`` names a device this torch can use, else a CLIError saying what there is."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no CUDA GPU is visible"
        raise CLIError(f"--device {device}: {why}; leave --device out to train on the CPU")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")


def cmd_train(args) -> int:
    from .train import Session, get_problem

    store = _open_writable(args.store)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.resume and args.branch:
        raise CLIError("--resume continues a run, --branch starts a new one from its checkpoint: give one of them")
    continued = args.resume or args.branch
    if continued:
        given = [f"--{k.replace('_', '-')}" for k in ("problem", "optimizer", "approx", "lr", "damping", "mu_max",
                                                       "batch_size", "seed", "polyak", "faces", "n")
                 if getattr(args, k) not in (None, False)] + [f"--option {k}" for k, _ in args.option]
        if args.no_momentum:
            given.append("--no-momentum")
        if given:
            how = "--resume continues" if args.resume else "--branch starts a new run from"
            raise CLIError(f"{how} run {continued} with its own settings; drop {', '.join(given)} "
                           "(change live settings in a dashboard, or start a new run)")
        overrides = {k: v for k, v in (("steps", args.steps), ("seconds", args.seconds),
                                        ("eval_every", args.eval_every), ("checkpoint_every", args.checkpoint_every),
                                        ("keep_checkpoints", args.keep_checkpoints), ("keep_every", args.keep_every),
                                        ("from_step", args.from_step))
                     if v is not None}
        from .store import NotFoundError, StoreError

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if args.resume:
                    session = Session.restore(store, args.resume, **overrides)
                else:
                    from_step = overrides.pop("from_step", None)
                    session = Session.branch(store, args.branch, from_step=from_step, **overrides)
        except (StoreError, ValueError) as exc:  # another writer holds the run, no such run/checkpoint, all damaged
            _warnings_as_lines("train", caught)
            store.close()
            if isinstance(exc, NotFoundError) and "checkpoint" not in str(exc):
                raise CLIError(f"no run {continued!r} in store {args.store!r}; `kfac-lab runs --store {args.store}` "
                               "lists the runs") from None
            if isinstance(exc, ValueError) and "custom problem" in str(exc):  # a Problem built in Python
                raise CLIError(f"run {continued} trained a problem defined in Python, which the command line "
                               "cannot rebuild: resume it in Python with kfac_lab.Session.restore(store, run_id, "
                               "problem=...)") from None
            raise CLIError(str(exc)) from None
        _warnings_as_lines("train", caught)
        if session.budget_steps is None and session.budget_seconds is None:
            raise CLIError(f"run {continued} has no budget: give --steps N (the run's new total) or --seconds S")
        if args.resume:
            print(f"resuming run {session.run_id} ({session.problem.describe()}, {session.optimizer_name}) "
                  f"from step {session.step}", flush=True)
        else:
            print(f"run {session.run_id}: branched from run {args.branch} at step {session.step} "
                  f"({session.problem.describe()}, {session.optimizer_name})", flush=True)
    else:
        problem_name = args.problem or "mnist"
        optimizer = args.optimizer or "kfac"
        kw = {}
        if args.n is not None:
            kw["n"] = args.n
        if args.faces:
            kw["path"] = args.faces
        try:
            problem = get_problem(problem_name, **kw)
        except FileNotFoundError as exc:
            if problem_name == "faces" and not args.faces:
                from .train.problems import FACES_ENV_VAR

                raise CLIError(f"--problem faces needs face images, which kfac_lab does not ship: give --faces PATH "
                               f"(a faces .npz/.npy file, or a directory holding olivetti_faces.npy) or set "
                               f"${FACES_ENV_VAR}=PATH") from None
            raise CLIError(str(exc)) from None
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        options = dict(args.option)
        _check_options(optimizer, options)
        flags = {"approx": args.approx, "lr": args.lr, "damping": args.damping, "mu_max": args.mu_max}
        options.update({k: v for k, v in flags.items() if v is not None})
        if args.no_momentum:
            options["momentum"] = False
        if optimizer != "kfac":
            bad = [f"--{k}" for k in ("approx", "damping") if flags[k] is not None] + \
                  (["--no-momentum"] if args.no_momentum else [])
            if bad:
                raise CLIError(f"{', '.join(bad)} apply to K-FAC only (--optimizer kfac)")
        if optimizer != "sgd" and args.mu_max is not None:
            raise CLIError("--mu-max applies to SGD-Nesterov only (--optimizer sgd)")
        if args.steps is None and args.seconds is None:
            raise CLIError("give --steps N or --seconds S (the training budget)")
        _check_device(args.device)
        if args.batch_size is not None and args.batch_size > problem.n:
            raise CLIError(f"--batch-size {args.batch_size} exceeds the {problem.n} training cases of --problem "
                           f"{problem_name}; give --batch-size {problem.n} or less")
        if args.from_step is not None:
            raise CLIError("--from-step picks the checkpoint to --resume (or --branch) RUN_ID from; give one of them")
        retention = {k: v for k, v in (("keep_checkpoints", args.keep_checkpoints), ("keep_every", args.keep_every))
                     if v is not None}
        try:
            session = Session(problem, optimizer, store, seed=args.seed or 0, batch_size=args.batch_size,
                              batch_schedule=args.batch_schedule, optimizer_options=options, steps=args.steps,
                              seconds=args.seconds, eval_every=args.eval_every or 10,
                              checkpoint_every=100 if args.checkpoint_every is None else args.checkpoint_every,
                              polyak=args.polyak, device=args.device, dtype=args.dtype, threads=args.threads,
                              **retention)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        print(f"run {session.run_id}: {session.problem.describe()}; {session.optimizer_name} "
              f"{json.dumps(session.optimizer_options) if session.optimizer_options else '(defaults)'}; "
              f"batch {session.batch_size}{' (growing schedule)' if session.batch_schedule else ''}; "
              f"store {args.store}", flush=True)

    progress = not args.no_progress
    every = args.print_every
    write = print
    if progress:
        from tqdm.auto import tqdm

        write = tqdm.write
    state = {"last_error": None}

    def report(m: dict) -> None:
        if "error" in m:
            state["last_error"] = m["error"]
        k = m.get("step", 0)
        if every and k % every == 0 and "loss" in m:
            parts = [f"step {k:>6d}", f"loss {_fmt(m.get('loss'))}", f"error {_fmt(state['last_error'])}",
                     f"wall {m.get('wall_time', 0.0):.1f}s"]
            for key, label in (("damping", "lambda"), ("alpha", "alpha"), ("mu", "mu"), ("lr", "lr")):
                if key in m:
                    parts.append(f"{label} {_fmt(m[key])}")
            write("  ".join(parts))

    session.subscribe(report)
    try:
        summary = session.run(progress=progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {session.step}; continue with: kfac-lab train --store {args.store} "
              f"--resume {session.run_id}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the session recorded it
        print(f"kfac-lab: run {session.run_id} failed at step {session.step + 1}: {type(exc).__name__}: {exc}\n"
              f"continue from its last checkpoint with: kfac-lab train --store {args.store} --resume {session.run_id}",
              file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"run {summary['run_id']} {summary['status']}: step {summary['step']}, wall time "
          f"{summary['wall_time']:.2f}s, loss {_fmt(summary['loss'])}, training error {_fmt(summary['error'])}"
          + (f" (best of iterate/average {_fmt(summary['error_best'])})" if summary.get("error_best") is not None else ""))
    print(f"run_id: {summary['run_id']}")
    return 0


# ------------------------------------------------------------------------------ runs
def runs_table(store, all_columns: bool = False):
    """The runs of ``store`` as a DataFrame with the final error and wall time of each, its
    checkpoints (count, total MB) and who writes it now. A damaged run is left out with one
    StoreWarning naming it and the damage."""
    import numpy as np
    import pandas as pd

    from .store import StoreError, StoreWarning

    table = store.runs()
    if table.empty:
        return table
    finals = {"error": [], "wall_time": [], "checkpoints": [], "checkpoint_MB": [], "writer": []}
    keep = []
    for rid in table.index:
        try:
            ds = store.load_run(rid)
            ck = store.checkpoint_info(rid)
            writer = store.writer(rid)
        except StoreError as exc:
            warnings.warn(f"skipping damaged run {rid!r}: {exc}", StoreWarning, stacklevel=2)
            continue
        keep.append(rid)
        for key in ("error", "wall_time"):
            v = np.nan
            if key in ds.data_vars:
                vals = ds[key].values.astype(float)
                vals = vals[~np.isnan(vals)]
                v = float(vals[-1]) if vals.size else np.nan
            finals[key].append(v)
        finals["checkpoints"].append(len(ck))
        finals["checkpoint_MB"].append(sum(c["nbytes"] for c in ck) / 1e6)
        finals["writer"].append(f"pid {writer.get('pid')}@{writer.get('host')}" if writer else "-")
    table = table.loc[keep].assign(final_error=finals["error"], wall_time=finals["wall_time"],
                                   checkpoints=finals["checkpoints"], checkpoint_MB=finals["checkpoint_MB"],
                                   writer=finals["writer"])
    if all_columns:
        return table
    cols = [c for c in ("problem", "optimizer", "label", "approx", "momentum", "lr", "seed", "steps", "last_step",
                        "final_error", "wall_time", "events", "checkpoints", "checkpoint_MB", "writer", "parent_run",
                        "created") if c in table.columns]
    return pd.DataFrame(table[cols])


def cmd_runs(args) -> int:
    import pandas as pd

    store = _open_existing(args.store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = runs_table(store, args.all)
    _warnings_as_lines("runs", caught)
    if table.empty:
        print(f"no runs in {args.store}")
        return 0
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


# ------------------------------------------------------------------------------ study
def _analysis(name: str):
    """``kfac_lab.analysis.<name>`` (or from its submodules), or a CLIError saying it is missing."""
    try:
        mod = importlib.import_module("kfac_lab.analysis")
    except ImportError as exc:
        raise CLIError(f"kfac_lab.analysis is not available ({exc})") from None
    fn = getattr(mod, name, None)
    if fn is None:
        for sub in ("fisher", "cumulants", "damping", "invariance"):
            try:
                fn = getattr(importlib.import_module(f"kfac_lab.analysis.{sub}"), name, None)
            except ImportError:
                fn = None
            if fn is not None:
                break
    if fn is None:
        raise CLIError(f"kfac_lab.analysis.{name} is not available in this version")
    return fn


def _call(fn, *args, **kw):
    """Call ``fn`` with only the keywords it accepts."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kw = {k: v for k, v in kw.items() if k in params}
    except (TypeError, ValueError):
        pass
    return fn(*args, **kw)


def run_study(figure: str, n: int | None = None, samples: int | None = None, seed: int = 0):
    """``(study name, Dataset)`` for a figure of the paper (see ``kfac-lab study --help``)."""
    figure = str(figure)
    if figure not in FIGURES:
        raise CLIError(f"unknown figure {figure!r}; choose one of {list(FIGURES)}")
    if figure == "invariance":
        return "invariance", _call(_analysis("invariance_study"), seed=seed)
    setup = _analysis("figure1_setup")
    model, x, y = _call(setup, n=n or 2000, seed=seed, return_labels=True)
    layers = [1, 2, 3, 4]  # the paper's middle 4 layers
    mod = importlib.import_module("kfac_lab.analysis")
    layers = list(getattr(mod, "FIGURE1_HIDDEN_LAYERS", layers))
    if figure in ("1", "2", "5", "6"):
        kw = {"layers": layers, "seed": seed}
        if samples:
            kw.update(mode="sampled", samples=samples)
        return f"figure{figure}", _call(_analysis("fisher_study"), model, "categorical", x, **kw)
    if figure == "7":
        return "figure7", _call(_analysis("damping_study"), model, "categorical", x, y, seed=seed)
    kw = {"layers": layers, "seed": seed}
    if samples:
        kw["samples"] = samples
    return "cumulants", _call(_analysis("cumulant_study"), model, "categorical", x, **kw)


def study_summary(ds) -> list[str]:
    """Lines describing a study Dataset: every scalar variable, the shapes of the others."""
    import numpy as np

    lines = []
    for name, var in ds.data_vars.items():
        if var.ndim == 0:
            v = var.values.item() if hasattr(var.values, "item") else var.values
            lines.append(f"  {name:<28s} {_fmt(float(v)) if isinstance(v, (int, float, np.number)) else v}")
    if "exact" in ds.data_vars and "kron" in ds.data_vars:  # figure 1: how far F̃ is from F
        F, K = np.asarray(ds["exact"].values, float), np.asarray(ds["kron"].values, float)
        lines.append(f"  {'relative error |F - F~|/|F|':<28s} {_fmt(float(np.linalg.norm(F - K) / np.linalg.norm(F)))}")
    for name, var in ds.data_vars.items():  # curves over steps: their final values
        if var.ndim > 0 and "step" in var.dims and 0 < var.size // max(var.sizes["step"], 1) <= 12:
            last = var.isel(step=-1)
            if last.ndim == 0:
                lines.append(f"  {name + ' (last step)':<28s} {_fmt(float(last))}")
                continue
            stacked = last.stack(_k=last.dims)
            for idx in range(stacked.size):
                item = stacked.isel(_k=idx)
                label = ", ".join(str(item[d].values) for d in last.dims)
                lines.append(f"  {name + ' [' + label + '] (last step)':<28s} {_fmt(float(item))}")
    others = [f"{name}{tuple(var.dims)}" for name, var in ds.data_vars.items() if var.ndim > 0]
    if others:
        lines.append("  arrays: " + ", ".join(others[:12]) + (f", … ({len(others)} in all)" if len(others) > 12 else ""))
    for key in ("model", "data", "training", "num_cases", "samples", "train_error"):
        if key in ds.attrs:
            lines.append(f"  {key}: {ds.attrs[key]}")
    return lines


def cmd_study(args) -> int:
    name, ds = run_study(args.figure, n=args.n, samples=args.samples, seed=args.seed)
    store = _open_writable(args.store) if args.store else None
    if store is not None:
        store.save_study(name, ds, overwrite=True)
        store.close()
    print(f"study {name}" + (f" saved to {args.store}" if store is not None else ""))
    for line in study_summary(ds):
        print(line)
    return 0


# ------------------------------------------------------------------------------ bench
def _load_benchmark(name: str):
    path = REPO_ROOT / "benchmarks" / f"{name}.py"
    if not path.exists():
        raise CLIError(f"benchmark {name!r} needs a source checkout of kfac_lab ({path} not found)")
    spec = importlib.util.spec_from_file_location(f"kfac_lab_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    if not hasattr(mod, "main"):
        raise CLIError(f"{path} has no main()")
    return mod


def cmd_bench(args) -> int:
    mod = _load_benchmark(args.name)
    rest = list(args.rest)
    if args.quick:
        rest.insert(0, "--quick")
    out = mod.main(rest)
    return int(out or 0)


# ------------------------------------------------------------------------------ lab
def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def lab_plan(store: str | None = None, port: int = LAB_PORT) -> dict:
    """What ``kfac-lab lab`` will do: ``{"mode": "serve-module"|"serve-files"|"study", …}``."""
    origins = [f"{LAB_ADDRESS}:{port}", f"localhost:{port}"]
    try:
        common = importlib.import_module("kfac_lab.dashboards.common")
        apps = [name for name, mod in dict(getattr(common, "APPS", {})).items() if _module_exists(mod)]
        if apps and hasattr(common, "serve"):
            return {"mode": "serve-module", "apps": apps, "address": LAB_ADDRESS, "port": port,
                    "origins": origins, "store": store}
    except Exception:  # noqa: BLE001 - dashboards missing or half-written: fall back
        pass
    files = sorted(str(p) for p in (REPO_ROOT / "dashboards").glob("*.py")) if (REPO_ROOT / "dashboards").is_dir() else []
    if files:
        cmd = [sys.executable, "-m", "panel", "serve", *files, "--address", LAB_ADDRESS, "--port", str(port), "--warm"]
        for o in origins:
            cmd += ["--allow-websocket-origin", o]
        return {"mode": "serve-files", "command": cmd, "port": port, "store": store}
    return {"mode": "study", "figure": "1", "store": store}


def cmd_lab(args) -> int:
    plan = lab_plan(args.store, args.port)
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    if plan["mode"] == "serve-module":
        common = importlib.import_module("kfac_lab.dashboards.common")
        print(f"serving {', '.join(plan['apps'])} on http://{LAB_ADDRESS}:{args.port}/ (Ctrl-C to stop)", flush=True)
        kw = {"store": args.store} if args.store else {}
        common.serve(plan["apps"], address=LAB_ADDRESS, port=args.port, show=False, websocket_origin=plan["origins"],
                     **kw)
        return 0
    if plan["mode"] == "serve-files":
        import subprocess

        env = dict(os.environ)
        if args.store:
            env[ENV_STORE] = args.store
        print(f"serving the dashboards on http://{LAB_ADDRESS}:{args.port}/ (Ctrl-C to stop)", flush=True)
        try:
            return subprocess.call(plan["command"], env=env)
        except KeyboardInterrupt:
            return 0
    print("the dashboards are not installed yet: running the figure-1 study instead "
          "(the 256-20-20-20-20-10 network on bundled MNIST)", flush=True)
    ns = argparse.Namespace(figure="1", n=args.n, samples=None, seed=0, store=args.store)
    return cmd_study(ns)


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from .train.problems import PROBLEMS

    parser = argparse.ArgumentParser(prog="kfac-lab", description="A laboratory for K-FAC (Martens & Grosse, 2015).")
    debug_help = f"show the full traceback of an error instead of one line (also: ${ENV_DEBUG}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", parents=[common], help="train a problem with K-FAC, SGD-Nesterov or Adam, logging to a store",
                       description="Train one optimizer on one problem; every step is logged to the store; "
                                   "checkpoints allow --resume.")
    _store_arg(t, "Created if missing.")
    t.add_argument("--problem", choices=list(PROBLEMS), help="default: mnist")
    t.add_argument("--optimizer", choices=["kfac", "sgd", "adam"], help="default: kfac")
    t.add_argument("--approx", choices=["blockdiag", "tridiag"], help="K-FAC's inverse approximation")
    t.add_argument("--no-momentum", action="store_true", help="K-FAC without momentum (α only)")
    t.add_argument("--lr", type=_positive_float, help="learning rate (K-FAC: a fixed α instead of the quadratic model)")
    t.add_argument("--damping", type=_damping, help="K-FAC's initial λ: a number (default: the paper's 150) or "
                   "'auto' (chosen from the first batch by a probe of the quadratic model)")
    t.add_argument("--mu-max", type=_mu_max, dest="mu_max", help="SGD-Nesterov's μ_max (0.99, 0.995, 0.999)")
    t.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any other optimizer option (repeatable), e.g. --option T3=10")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_nonneg_int, help="total steps of the run")
    budget.add_argument("--seconds", type=_positive_float, help="total training seconds of the run")
    t.add_argument("--batch-size", type=_positive_int, dest="batch_size")
    t.add_argument("--batch-schedule", action="store_true", help="the paper's growing batch (m₁ = --batch-size)")
    t.add_argument("--polyak", type=_decay, help="Polyak averaging decay ξ (the paper: 0.99)")
    t.add_argument("--resume", metavar="RUN_ID",
                   help="continue this run from its newest intact checkpoint (damaged ones are skipped, each with "
                        "a warning line)")
    t.add_argument("--branch", metavar="RUN_ID",
                   help="start a new run from this run's newest intact checkpoint, with its settings (only reads "
                        "it: works while another process still writes it)")
    t.add_argument("--from-step", type=_nonneg_int, dest="from_step", metavar="K",
                   help="with --resume or --branch: the checkpoint at step K")
    t.add_argument("--keep-checkpoints", type=_positive_int, dest="keep_checkpoints", metavar="N",
                   help="keep only the newest N checkpoints of the run (default 3)")
    t.add_argument("--keep-every", type=_positive_int, dest="keep_every", metavar="N",
                   help="also keep every checkpoint whose step is a multiple of N")
    t.add_argument("--seed", type=_seed)
    t.add_argument("--n", type=_positive_int, help="number of training cases")
    t.add_argument("--faces", metavar="PATH", help="the faces file for --problem faces")
    t.add_argument("--eval-every", type=_positive_int, dest="eval_every")
    t.add_argument("--checkpoint-every", type=_nonneg_int, dest="checkpoint_every", help="0: only at the end")
    t.add_argument("--print-every", type=_nonneg_int, dest="print_every", default=50,
                   help="print a summary line every N steps (0: never; default 50)")
    t.add_argument("--no-progress", action="store_true", dest="no_progress", help="no progress bar")
    t.add_argument("--threads", type=_positive_int, help="torch intra-op threads")
    t.add_argument("--device", help="e.g. cuda")
    t.add_argument("--dtype", choices=["float32", "float64"])
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("runs", parents=[common], help="list the runs of a store")
    _store_arg(r, "Must exist.")
    r.add_argument("--all", action="store_true", help="every attribute column")
    r.set_defaults(func=cmd_runs)

    s = sub.add_parser("study", parents=[common], help="the paper's curvature studies (figures 1, 2, 5, 6, 7, cumulants, invariance)")
    s.add_argument("--figure", required=True, choices=FIGURES)
    s.add_argument("--store", metavar="PATH", default=os.environ.get(ENV_STORE, "").strip() or None,
                   help="save the study there (as 'figure<N>', 'cumulants' or 'invariance')")
    s.add_argument("--samples", type=_positive_int, help="sampled targets per case (default: exact expectations)")
    s.add_argument("--n", type=_positive_int, help="cases (default 2000; the bundled MNIST has 5000)")
    s.add_argument("--seed", type=_seed, default=0)
    s.set_defaults(func=cmd_study)

    b = sub.add_parser("bench", parents=[common], help="run a benchmark from benchmarks/ (e.g. race)")
    b.add_argument("name", choices=["race"])
    b.add_argument("--quick", action="store_true", help="the small smoke version")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    b.set_defaults(func=cmd_bench)

    lab = sub.add_parser("lab", parents=[common], help="serve the dashboards (training lab, Fisher explorer) on 127.0.0.1:5006")
    lab.add_argument("--store", metavar="PATH", default=os.environ.get(ENV_STORE, "").strip() or None)
    lab.add_argument("--port", type=_positive_int, default=LAB_PORT)
    lab.add_argument("--n", type=_positive_int, default=2000,
                     help="cases of the figure-1 study run instead when the dashboards cannot be imported")
    lab.add_argument("--dry-run", action="store_true", dest="dry_run", help="print what would run, and exit")
    lab.set_defaults(func=cmd_lab)
    return parser


def _user_error(exc: BaseException) -> bool:
    """Is ``exc`` a user's mistake (one line, exit 2) rather than a bug (exit 1)? The library's own
    errors are (``KFACError`` and its kin: memory limits, bad state, store errors, ``CLIError``),
    and so are ``ValueError``/``TypeError`` raised by kfac_lab's own validation — i.e. raised in a
    kfac_lab frame. The same classes raised inside torch, numpy or the standard library are bugs."""
    from .errors import KFACError
    from .store import StoreError

    if isinstance(exc, (CLIError, KFACError, StoreError)):
        return True
    if isinstance(exc, (ValueError, TypeError)):
        tb = exc.__traceback__
        last = None
        while tb is not None:
            last = tb
            tb = tb.tb_next
        return last is not None and Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)
    return False


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kfac-lab``; returns the exit status: 0 done, 2 a user error (one line on
    stderr naming the problem and the fix), 1 an internal error (one line; ``--debug`` or
    ``KFAC_LAB_DEBUG=1`` shows the traceback), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get(ENV_DEBUG, "").strip() not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `kfac-lab runs | head`
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"kfac-lab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line (the traceback with --debug)
        if debug:
            raise
        if _user_error(exc):
            print(f"kfac-lab {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"kfac-lab {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              f"(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
