"""The Fisher explorer's logic, without a browser: settings → background study → figures.

A thin shell: :mod:`kfac_lab.analysis` computes the studies (``fisher_study``,
``cumulant_study``), :mod:`kfac_lab.viz` draws them, :mod:`kfac_lab.store` holds checkpoints and
saved studies. This module adds the settings (:class:`FisherSettings`), the background
computation with progress (:class:`FisherExplorerApp`); the page is
:mod:`kfac_lab.dashboards.fisher_explorer`.

Long computations never block the page: they run on a small thread pool and report through a
queue that the page drains on its own event loop (``poll``). Figure 1 is sent as soon as the
Fisher study is done (a ``"partial"`` result), the other figures when the rest is. Results are
cached per process (the figure-1 network, the studies, the figures), so a second visitor or a
reload is instant; :func:`warm_up` starts the default study when the server starts (``panel serve
--warm``, or :func:`kfac_lab.dashboards.serve`), so even the first visitor finds it ready.

Serve with ``panel serve dashboards/fisher_explorer.py`` (see :mod:`kfac_lab.dashboards`).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import param

from .. import checks
from ..errors import KFACError
from .common import open_store

__all__ = ["FisherSettings", "FisherExplorerApp", "FAST_DEFAULTS", "MAX_PARAMS", "network_layers", "clear_caches",
           "build_figures", "Result", "warm_up"]

log = logging.getLogger(__name__)

#: The most parameters a study may cover (dense P×P matrices: 3000² doubles = 72 MB each).
MAX_PARAMS = 3000
#: Small settings for tests and quick demos (a few seconds on 2 cores).
FAST_DEFAULTS = {"cases": 300, "kfac_steps": 2, "layers": [2, 3], "resolution": 128}
FIGURE1 = "figure1"
#: The figure-1 CNN (a problem of the registry): the Fisher of a convolutional network, with the
#: KFC-expand / KFC-reduce / EKFAC approximations side by side (the view ``ekfac``).
FIGURE1_CNN = "fig1-cnn"
TRAINED = (FIGURE1, FIGURE1_CNN)   # sources trained here for ``kfac_steps`` K-FAC iterations
SOURCES = {"figure-1 network (MNIST 16×16)": FIGURE1,
           "figure-1 CNN (MNIST 16×16, convolutions)": FIGURE1_CNN,
           "checkpoint of a training run": "checkpoint",
           "study saved in the store": "study"}
TABS = ("figure1", "figure2", "quality", "cumulants")


# --------------------------------------------------------------------------- settings
class FisherSettings(param.Parameterized):
    """What to study. The page edits these; :meth:`FisherExplorerApp.request` snapshots them."""

    source = param.Selector(default=FIGURE1, objects=list(SOURCES.values()),
                            doc="the network: the figure-1 network, a run's checkpoint, or a saved study")
    run_id = param.String(default="", doc="run whose checkpoint to study (source='checkpoint')")
    checkpoint_step = param.Integer(default=None, allow_None=True, doc="its step (None: the latest)")
    study = param.String(default="", doc="name of a saved study (source='study')")
    cases = param.Integer(default=1000, bounds=(10, 100_000), doc="N: cases the expectations run over")
    kfac_steps = param.Integer(default=5, bounds=(0, 200),
                               doc="training stage of the figure-1 network: full-batch K-FAC iterations")
    layers = param.List(default=[1, 2, 3, 4], item_type=int,
                        doc="K-FAC layers (0-based) to study; the paper: the middle 4 of figure 1")
    mode = param.Selector(default="exact", objects=["exact", "sampled"],
                          doc="expectations over the model's distribution, or sampled targets")
    samples = param.Integer(default=1, bounds=(1, 1000), doc="targets drawn per case (mode='sampled')")
    gamma = param.Number(default=1e-3, bounds=(0, None), doc="γ of the approximate inverses (0: none)")
    cumulants = param.Boolean(default=True, doc="also compute the cumulant study (eqns 3–4)")
    seed = param.Integer(default=0, bounds=(0, checks.SEED_MAX))  # torch.manual_seed's range
    resolution = param.Selector(default=256, objects=[64, 128, 256, 512],
                                doc="largest heatmap side sent to the browser (block-averaged above it)")
    zoom = param.String(default="all", doc="'all' or 'i,j': one layer block (i, j) at full resolution")


# --------------------------------------------------------------------------- caches
class _LRU:
    """A small thread-safe LRU cache whose ``get_or_compute`` computes each key once even when
    several sessions ask at the same time (the others wait for it)."""

    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict = OrderedDict()
        self.lock = threading.Lock()
        self.key_locks: dict[Any, threading.Lock] = {}

    def get_or_compute(self, key, fn: Callable[[], Any]):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
            klock = self.key_locks.setdefault(key, threading.Lock())
        with klock:
            with self.lock:
                if key in self.data:
                    return self.data[key]
            value = fn()
            with self.lock:
                self.data[key] = value
                self.data.move_to_end(key)
                while len(self.data) > self.size:
                    self.data.popitem(last=False)
                self.key_locks.pop(key, None)
            return value

    def __contains__(self, key) -> bool:
        with self.lock:
            return key in self.data

    def clear(self) -> None:
        with self.lock:
            self.data.clear()


_NETWORKS = _LRU(4)
_STUDIES = _LRU(3)
_FIGURES = _LRU(12)
_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()
_WARMED: set = set()               # settings whose study warm_up() has started
_WARMED_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fisher-explorer")
        return _EXECUTOR


def clear_caches() -> None:
    """Forget the cached networks, studies and figures of this process."""
    for c in (_NETWORKS, _STUDIES, _FIGURES):
        c.clear()
    with _WARMED_LOCK:
        _WARMED.clear()


# --------------------------------------------------------------------------- networks
@dataclass
class Network:
    """A network to study: the model, its loss name, cases ``x`` and a description."""

    model: Any
    loss: str
    x: Any
    description: str
    key: tuple = field(default=())


def network_layers(sizes: list[int]) -> list[tuple[int, str, int]]:
    """``(index, label, parameters)`` of each Linear layer of a chain ``sizes``."""
    return [(i, f"L{i + 1}: {a}→{b}", (a + 1) * b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]


def model_layers(model) -> list[tuple[int, str, int]]:
    """``(index, label, parameters)`` of each K-FAC layer of ``model`` (linear or convolution):
    ``"L1: conv 1→4, 3×3"``, ``"L3: 64→10"``."""
    from ..curvature.geometry import geometry
    from ..curvature import find_layers

    out = []
    for layer in find_layers(model):
        g = geometry(layer)
        kind = (f"conv {g.in_channels}→{g.d_out}, {'×'.join(map(str, g.kernel))}" if g.is_conv
                else f"{g.in_channels}→{g.d_out}")
        out.append((layer.index, f"L{layer.index + 1}: {kind}", g.num_params))
    return out


def _figure1_network(cases: int, seed: int, kfac_steps: int) -> Network:
    from ..analysis import figure1_setup

    key = (FIGURE1, cases, seed, kfac_steps)

    def make():
        model, x = figure1_setup(n=cases, seed=seed, kfac_steps=kfac_steps)
        prov = getattr(model, "kfac_provenance", {})
        err = prov.get("train_error")
        desc = (f"figure-1 network after {kfac_steps} K-FAC iterations on {x.shape[0]} cases"
                + (f" (training error {100 * err:.1f}%)" if err is not None else ""))
        return Network(model, "categorical", x, desc, key)

    return _NETWORKS.get_or_compute(key, make)


def _problem_network(name: str, cases: int, seed: int, kfac_steps: int) -> Network:
    """The registry's problem ``name`` (its model at ``seed``) after ``kfac_steps`` full-batch K-FAC
    iterations on its first ``cases`` cases (statistics and exact-F products on the whole batch, as
    ``figure1_setup`` trains the figure-1 network)."""
    key = (name, cases, seed, kfac_steps)

    def make():
        import torch

        from ..optim import KFAC
        from ..train import get_problem

        problem = get_problem(name, seed=seed)
        model = problem.make_model(seed)
        x, y = problem.X[: int(cases)], problem.Y[: int(cases)]
        if kfac_steps:
            opt = KFAC(model, problem.loss, damping=1e-3, stats_fraction=1.0, fisher_fraction=1.0, seed=seed,
                       approx="blockdiag")
            for _ in range(int(kfac_steps)):
                opt.step(x, y)
        model.eval()
        with torch.no_grad():
            err = float((model(x).argmax(1) != y).double().mean()) if problem.loss == "categorical" else None
        desc = (f"{name} after {kfac_steps} K-FAC iterations on {x.shape[0]} cases"
                + (f" (training error {100 * err:.1f}%)" if err is not None else ""))
        return Network(model, problem.loss, x, desc, key)

    return _NETWORKS.get_or_compute(key, make)


def _checkpoint_network(store, run_id: str, step: int | None, cases: int, seed: int) -> Network:
    """The model of ``run_id`` at checkpoint ``step`` (default latest), with ``cases`` inputs of
    its problem's data. Uses the problem registry of :mod:`kfac_lab.train`."""
    key = ("checkpoint", str(store.path), run_id, step, cases, seed)

    def make():
        import torch

        from ..train import get_problem

        attrs = store.runs().loc[run_id].to_dict() if run_id in store.runs().index else {}
        name = attrs.get("problem")
        if not name:
            raise ValueError(f"run {run_id!r} does not say which problem it trained (attr 'problem')")
        problem = get_problem(str(name))
        ck = store.load_checkpoint(run_id, step)
        model = _problem_model(problem, seed)
        model.load_state_dict(ck["model"])
        model.eval()
        x = _problem_inputs(problem, cases, seed)
        loss = _problem_loss(problem, model)
        desc = f"run {run_id} ({name}) at step {ck['step']}, {x.shape[0]} cases"
        with torch.no_grad():
            model(x[:2])  # fail here, with the problem named, if the data does not fit the model
        return Network(model, loss, x, desc, key)

    return _NETWORKS.get_or_compute(key, make)


def _problem_model(problem, seed: int):
    return problem.make_model(seed)


def _problem_inputs(problem, cases: int, seed: int):
    return problem.X[: int(cases)]


def _problem_loss(problem, model) -> str:
    return problem.loss


def _source_model(source: str, seed: int):
    from ..train import get_problem

    return _problem_model(get_problem(source, seed=seed), seed)


# --------------------------------------------------------------------------- results
@dataclass
class Result:
    """What one request produced: datasets, figures by name, a summary line."""

    fisher: Any = None
    cumulant: Any = None
    figures: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def build_figures(fisher, cumulant, resolution: int, zoom: str,
                  only: tuple[str, ...] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Figures by view key (:data:`kfac_lab.lab.fisher.FISHER_VIEWS`: ``figure1``, ``ekfac``, ``figure2``,
    ``block_averages``, ``inverse_quality``, ``cumulant_maps``, ``cumulant_totals``) of the
    datasets present; notes say what could not be drawn. ``only``: just these keys (e.g.
    ``("figure1",)`` to show it before the rest)."""
    from ..lab.fisher import build_view, views

    figs: dict[str, Any] = {}
    notes: list[str] = []
    for key, view in views().items():
        ds = cumulant if key.startswith("cumulant") else fisher
        if ds is None or (only is not None and key not in only):
            continue
        if view.any_of and not any(n in ds.variables for n in view.any_of):
            continue  # nothing beside F̃ to compare (an MLP study without EKFAC): figure 1 shows it
        try:
            figs[key] = build_view(ds, key, max_size=resolution if view.matrix else None, zoom=zoom)
        except ValueError as exc:
            notes.append(f"{key}: {exc}")
    return figs, notes


# --------------------------------------------------------------------------- the app object
class FisherExplorerApp:
    """The explorer's logic, without a browser: settings → background study → figures.

    >>> app = FisherExplorerApp(**FAST_DEFAULTS)          # doctest: +SKIP
    >>> app.compute().figures["figure1"]               # synchronous (tests, notebooks)
    >>> app.request(); ...; app.poll()                 # asynchronous (the page does this)

    ``store``: a :class:`~kfac_lab.store.Store` or path (default: :func:`open_store`).
    Messages for bad settings are in :attr:`errors` (by setting name) and never raise.
    """

    def __init__(self, store=None, settings: FisherSettings | None = None, **overrides):
        self._store = store
        self.settings = settings or FisherSettings()
        if "damping" in overrides:  # the old name of gamma (it meant γ, not λ)
            overrides["gamma"] = checks.renamed("FisherExplorerApp", "damping", "gamma", overrides.pop("damping"),
                                                overrides.get("gamma"))
        if overrides:
            self.settings.param.update(**overrides)
        self.errors: dict[str, str] = {}
        self.inbox: queue.Queue = queue.Queue()
        self._generation = itertools.count(1)
        self.current = 0             # generation of the latest request
        self.busy = False
        self.progress = 0            # percent of the latest request
        self.status = "ready"
        self.result: Result | None = None
        self.listeners: list[Callable[[str], None]] = []   # the page: called with "progress"/"result"
        self.closed = False
        self._layer_cache: dict[str, list] = {}

    # -- store ------------------------------------------------------------------
    @property
    def store(self):
        if self._store is None or isinstance(self._store, (str, bytes)) or hasattr(self._store, "__fspath__"):
            self._store = open_store(self._store)
        return self._store

    def checkpointed_runs(self) -> dict[str, str]:
        """``{label: run_id}`` of the store's runs that have checkpoints."""
        out = {}
        try:
            table = self.store.runs(verify=True)  # damaged runs left out, one warning each
        except Exception as exc:  # noqa: BLE001 - a damaged store is reported, not raised
            self.errors["store"] = str(exc)
            return out
        for rid, row in table.iloc[::-1].head(100).iterrows():   # the 100 newest runs
            try:
                steps = self._checkpoint_steps(rid)
            except Exception:  # noqa: BLE001
                steps = []
            if steps:
                out[f"{rid} · {row.get('problem', '?')} · {row.get('optimizer', '?')} · {len(steps)} checkpoints"] = rid
        return out

    def _checkpoint_steps(self, run_id: str) -> list[int]:
        ck = self.store.checkpoints(run_id)
        if hasattr(ck, "tolist"):
            ck = ck.tolist()
        return sorted(int(s) for s in ck)

    def saved_studies(self) -> list[str]:
        try:
            return self.store.studies()
        except Exception as exc:  # noqa: BLE001
            self.errors["store"] = str(exc)
            return []

    # -- validation ---------------------------------------------------------------
    def layer_choices(self) -> list[tuple[int, str, int]]:
        """Layers of the current network: ``(index, label, parameters)``."""
        s = self.settings
        if s.source == FIGURE1:
            from ..models import FIGURE1_SIZES

            return network_layers(list(FIGURE1_SIZES))
        if s.source == FIGURE1_CNN:
            if s.source not in self._layer_cache:
                self._layer_cache[s.source] = model_layers(_source_model(s.source, s.seed))
            return self._layer_cache[s.source]
        if s.source == "checkpoint" and s.run_id:
            if s.run_id in self._layer_cache:
                return self._layer_cache[s.run_id]
            try:
                from ..train import get_problem

                name = self.store.runs().loc[s.run_id].get("problem")
                model = _problem_model(get_problem(str(name)), s.seed)
                out = self._layer_cache[s.run_id] = model_layers(model)
                return out
            except Exception as exc:  # noqa: BLE001
                self.errors["run_id"] = f"cannot read the network of run {s.run_id!r}: {exc}"
        return []

    def validate(self) -> dict[str, str]:
        """Messages for settings that cannot be computed, by setting name (empty: all fine)."""
        s = self.settings
        errs: dict[str, str] = {}
        if s.source == "study":
            if not s.study:
                errs["study"] = "choose a saved study"
            return errs
        if s.source == "checkpoint" and not s.run_id:
            errs["run_id"] = "choose a run with checkpoints (train one in the Training lab)"
            return errs
        if not s.layers:
            errs["layers"] = "choose at least one layer"
            return errs
        choices = {i: (lab, p) for i, lab, p in self.layer_choices()}
        if choices:
            unknown = [i for i in s.layers if i not in choices]
            if unknown:
                errs["layers"] = f"this network has no layer {unknown} (it has {len(choices)} layers)"
                return errs
            P = sum(choices[i][1] for i in s.layers)
            if P > MAX_PARAMS:
                errs["layers"] = (f"these layers have {P:,} parameters; a dense study is limited to "
                                  f"{MAX_PARAMS:,} — choose fewer or smaller layers")
        if s.zoom not in ("", "all"):
            try:
                i, j = (int(v) for v in s.zoom.split(","))
            except ValueError:
                errs["zoom"] = f"zoom {s.zoom!r}: use 'all' or 'i,j'"
            else:
                if i not in s.layers or j not in s.layers:
                    s.zoom = "all"
        return errs

    # -- computing ---------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        s = self.settings
        return {k: (list(v) if isinstance(v, list) else v) for k, v in s.param.values().items() if k != "name"}

    def _network(self, snap) -> Network:
        if snap["source"] == FIGURE1:
            return _figure1_network(snap["cases"], snap["seed"], snap["kfac_steps"])
        if snap["source"] == FIGURE1_CNN:
            return _problem_network(snap["source"], snap["cases"], snap["seed"], snap["kfac_steps"])
        return _checkpoint_network(self.store, snap["run_id"], snap["checkpoint_step"], snap["cases"], snap["seed"])

    def _studies(self, snap, report: Callable[[int, str], None],
                 early: Callable[[Any, str, Any], None] = lambda fisher, desc, fkey: None, notes: list | None = None):
        """``(fisher, cumulant, description, key)`` for the settings snapshot (cached by key).
        ``early(fisher, description, fisher_key)`` is called once the Fisher study is ready,
        when the cumulant study still has to be computed (the page shows figure 1 meanwhile).
        ``notes``: gets a line for each study that could not be computed for this network (and why)."""
        notes = [] if notes is None else notes
        if snap["source"] == "study":
            report(30, f"loading study {snap['study']!r} from the store…")
            ds = self.store.load_study(snap["study"])
            fisher = ds if "exact" in ds.data_vars or "kron_inverse" in ds.data_vars else None
            cum = ds if "total_error" in ds.data_vars else None
            if fisher is None and cum is None:
                raise ValueError(f"study {snap['study']!r} holds neither a Fisher nor a cumulant study")
            return fisher, cum, f"saved study {snap['study']}", ("study", str(self.store.path), snap["study"])
        from ..analysis import approximation_study, cumulant_study

        report(5, "preparing the network (training the figure-1 network the first time)…")
        net = self._network(snap)
        layers = sorted(set(snap["layers"]))
        common = (net.key, tuple(layers), snap["seed"])
        fkey = ("fisher",) + common + (snap["mode"], snap["samples"] if snap["mode"] == "sampled" else 0,
                                       float(snap["gamma"]))
        report(25, f"exact Fisher, F̃ and inverses of layers {[i + 1 for i in layers]} ({snap['mode']})…")
        want = float(snap["gamma"]) > 0 or snap["source"] != FIGURE1 or max(layers) < 4

        def study():
            kw = dict(layers=layers, mode=snap["mode"], samples=snap["samples"], gamma=float(snap["gamma"]),
                      seed=snap["seed"])
            try:
                return approximation_study(net.model, net.loss, net.x, inverses=want, **kw), None
            except KFACError as exc:  # F̃ without an inverse at this γ: figure 1 and EKFAC still, and why
                if not want:
                    raise
                ds = approximation_study(net.model, net.loss, net.x, inverses=False, **kw)
                return ds, f"F̃⁻¹ and the inverse quality (figures 2, 5–6) not computed: {exc}"

        fisher, note = _STUDIES.get_or_compute(fkey, study)
        if note:
            notes.append(note)
        cum, ckey = None, None
        if snap["cumulants"]:
            ckey = ("cumulant",) + common + (snap["samples"],)
            if ckey not in _STUDIES:
                early(fisher, net.description, fkey)
            report(60, "cumulants κ₄, κ₃ and the bound (eqns 3–4)…")
            try:
                cum = _STUDIES.get_or_compute(ckey, lambda: cumulant_study(
                    net.model, net.loss, net.x, layers=layers, samples=snap["samples"], seed=snap["seed"]))
            except ValueError as exc:  # convolutions with different numbers of locations cannot be paired
                notes.append(f"cumulants (eqns 3–4) not computed: {exc}")
                ckey = None
        return fisher, cum, net.description, (fkey, ckey)

    def compute(self, report: Callable[[int, str], None] | None = None) -> Result:
        """Compute the study and figures for the current settings, here and now (may take seconds).
        Raises ``ValueError`` for settings that :meth:`validate` rejects."""
        errs = self.validate()
        if errs:
            raise ValueError("; ".join(f"{k}: {v}" for k, v in errs.items()))
        return self._compute(self._snapshot(), report or (lambda p, t: None))

    def _compute(self, snap, report, partial: Callable[[Result], None] | None = None) -> Result:
        """The study and figures of ``snap``; ``partial(result)`` receives figure 1 alone first
        when the rest still has to be computed (nothing when everything is cached)."""
        t0 = time.perf_counter()
        shown: dict[str, Any] = {}   # figures already sent with the partial result (not sent again)

        def early(fisher, desc, fkey):
            if partial is None or fisher is None:
                return
            key = ((fkey, None), snap["resolution"], snap["zoom"], "figure1")
            figs, notes = _FIGURES.get_or_compute(key, lambda: build_figures(
                fisher, None, snap["resolution"], snap["zoom"], only=("figure1",)))
            if figs:
                shown.update(figs)
                partial(Result(fisher, None, figs, desc + " · cumulants (eqns 3–4) still computing…",
                               time.perf_counter() - t0, notes))

        study_notes: list[str] = []
        fisher, cum, desc, skey = self._studies(snap, report, early, study_notes)
        report(85, "drawing…")
        fkey = (skey, snap["resolution"], snap["zoom"])
        figs, notes = _FIGURES.get_or_compute(fkey, lambda: build_figures(fisher, cum, snap["resolution"], snap["zoom"]))
        figs = {**figs, **{k: v for k, v in shown.items() if k in figs}}
        if any(n.startswith("F̃⁻¹") for n in study_notes):   # said once, not per figure
            notes = [n for n in notes if not n.startswith(("figure2:", "block_averages:", "inverse_quality:"))]
        parts = [desc]
        if fisher is not None and "exact" in fisher.data_vars:
            parts.append(f"P = {fisher.sizes['row']:,} parameters")
        if fisher is not None and "blockdiag_rel_error" in fisher.data_vars:
            parts.append(f"inverse error: block-diagonal {float(fisher['blockdiag_rel_error']):.3g}"
                         + (f", tridiagonal {float(fisher['tridiag_rel_error']):.3g}"
                            if "tridiag_rel_error" in fisher.data_vars else ", no tridiagonal (weight sharing)")
                         + (f", EKFAC {float(fisher['ekfac_rel_error']):.3g} (vs F)"
                            if "ekfac_rel_error" in fisher.data_vars else ""))
        if cum is not None:
            parts.append(f"Σ|error| = {float(cum['total_error']):.4g}, Σ bound = {float(cum['total_bound']):.4g}")
        return Result(fisher, cum, figs, " · ".join(parts), time.perf_counter() - t0, study_notes + notes)

    def request(self) -> int:
        """Start computing the current settings in the background (a newer request supersedes
        an older one). Returns the request's generation; 0 when the settings are invalid (see
        :attr:`errors`)."""
        self.errors = self.validate()
        if self.errors:
            self.status = "fix the settings marked in red"
            self._notify("errors")
            return 0
        gen = next(self._generation)
        self.current, self.busy, self.progress = gen, True, 0
        self.status = "queued…"
        snap = self._snapshot()

        def report(pct: int, text: str) -> None:
            self.inbox.put(("progress", gen, pct, text))

        def job():
            if self.closed or gen != self.current:
                return  # superseded before it started
            try:
                res = self._compute(snap, report, lambda r: self.inbox.put(("partial", gen, r)))
            except Exception as exc:  # noqa: BLE001 - shown on the page, not raised in a pool thread
                log.info("fisher explorer request failed", exc_info=True)
                self.inbox.put(("error", gen, f"{type(exc).__name__}: {exc}"))
            else:
                self.inbox.put(("done", gen, res))

        _executor().submit(job)
        self._notify("progress")
        return gen

    def poll(self) -> bool:
        """Apply what the background computation reported (call on the page's event loop).
        Returns whether anything changed."""
        changed = False
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            kind, gen = item[0], item[1]
            if gen != self.current:
                continue  # a superseded request
            changed = True
            if kind == "progress":
                self.progress, self.status = item[2], item[3]
                self._notify("progress")
            elif kind == "partial":  # figure 1 first; still busy with the rest
                self.result = item[2]
                self._notify("partial")
            elif kind == "error":
                self.busy, self.progress, self.status = False, 0, item[2]
                self.errors["compute"] = item[2]
                self._notify("errors")
            else:
                res: Result = item[2]
                self.busy, self.progress, self.result = False, 100, res
                self.status = f"done in {res.seconds:.1f} s — {res.summary}"
                self._notify("result")
        return changed

    def wait(self, timeout: float = 120.0) -> Result | None:
        """Poll until the latest request finished (tests and scripts)."""
        t0 = time.monotonic()
        while self.busy and time.monotonic() - t0 < timeout:
            self.poll()
            time.sleep(0.02)
        self.poll()
        return self.result

    def save_study(self) -> list[str]:
        """Save the current result's datasets to the store; returns the study names."""
        if self.result is None:
            raise ValueError("nothing to save yet: compute a study first")
        s = self.settings
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"explorer-{s.source}-{'-'.join(str(i + 1) for i in sorted(s.layers))}-{s.mode}-{stamp}"
        names = []
        if self.result.fisher is not None and s.source != "study":
            self.store.save_study(base + "-fisher", self.result.fisher, overwrite=True)
            names.append(base + "-fisher")
        if self.result.cumulant is not None and s.source != "study":
            self.store.save_study(base + "-cumulants", self.result.cumulant, overwrite=True)
            names.append(base + "-cumulants")
        return names

    def _notify(self, what: str) -> None:
        for fn in list(self.listeners):
            fn(what)

    def close(self) -> None:
        """The page went away: drop pending work (a running study finishes into the cache)."""
        self.closed = True
        self.current = -1
        self.listeners.clear()


def warm_up(**settings):
    """Start computing the study of ``settings`` (default: the page's defaults, figure 1 of the
    paper) in the background, once per process, so that the first visitor finds it cached.

    Returns the ``Future`` (``None`` when already started or when the settings need a store).
    The page's own request for the same settings waits for this computation instead of
    repeating it. ``panel serve --warm`` (see :func:`~kfac_lab.dashboards.panel_serve_args`)
    reaches this at server start through :func:`create_app`.
    """
    app = FisherExplorerApp(store=None, **settings)
    if app.settings.source != FIGURE1 or app.validate():
        return None
    snap = app._snapshot()
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in snap.items()))
    with _WARMED_LOCK:
        if key in _WARMED:
            return None
        _WARMED.add(key)

    def job():
        try:
            app._compute(snap, lambda pct, text: None)
        except Exception:  # noqa: BLE001 - the page's own request reports it
            log.info("fisher explorer warm-up failed", exc_info=True)

    return _executor().submit(job)
